"""HFCallback inside a real transformers Trainer: compressed while training (with gradient
accumulation), plain afterwards, and training like the plain Trainer."""

import copy

import pytest
import torch

import torchmesa

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Seen(transformers.TrainerCallback):
    """Records, at every optimizer step, whether the model was compressed then."""

    def __init__(self):
        self.compressed = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.compressed.append(torchmesa.is_compressed(model))


def tiny_gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = 0
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def train(model, tmp_path, callbacks):
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (32, 32), generator=g)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
        logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    result = trainer.train()
    return result.training_loss, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_trainer_with_the_callback_trains_compressed_and_ends_plain(tmp_path):
    model = tiny_gpt2()
    plain = copy.deepcopy(model)
    seen = Seen()
    loss, curve = train(model, tmp_path / "a", [torchmesa.HFCallback(), seen])
    assert seen.compressed == [True] * 6
    assert not torchmesa.is_compressed(model)
    ref_loss, ref_curve = train(plain, tmp_path / "b", [])
    assert len(curve) == len(ref_curve) == 6
    assert abs(loss - ref_loss) / ref_loss < 0.01
    for a, b in zip(curve, ref_curve, strict=False):
        assert abs(a - b) / b < 0.02


@pytest.mark.slow
def test_trainer_callback_takes_rules(tmp_path):
    model = tiny_gpt2()
    seen = Seen()
    rules = [torchmesa.Rule("lm_head", None)]
    train(model, tmp_path, [torchmesa.HFCallback(rules), seen])
    assert all(seen.compressed) and not torchmesa.is_compressed(model)
