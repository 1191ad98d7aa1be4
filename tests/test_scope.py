"""What opens a compressed call of the tree (torchmesa.scope)."""

from torch import nn

from torchmesa.scope import _tree_tensors


def test_one_walk_finds_what_parameters_and_buffers_give():
    shared = nn.Linear(4, 4)
    tied = nn.Linear(4, 4)
    tied.weight = shared.weight  # the same parameter in two modules
    norm = nn.BatchNorm1d(4)
    norm.register_buffer("unused", None)  # a buffer slot left empty
    norm.register_parameter("absent", None)
    root = nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, tied), norm)
    parameters, buffers = _tree_tensors(root)
    assert [id(p) for p in parameters] != [] and sorted(map(id, parameters)) == sorted(
        map(id, root.parameters())
    )
    assert len(parameters) == len(list(root.parameters()))
    assert sorted(map(id, buffers)) == sorted(map(id, root.buffers()))
    assert len(buffers) == len(list(root.buffers()))
