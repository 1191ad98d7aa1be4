"""Side-by-side memory and speed: exact vs torchmesa vs activation checkpointing.

The suite lives in ``torchmesa.apps.benchmark`` (so that ``torchmesa bench`` runs it too); see
there for what it measures and how.

    python benchmarks/bench.py                 # quick: DeiT-S and a 4-layer GPT-2-small
    python benchmarks/bench.py --models deit-b gpt2-s --batch 8
"""

from torchmesa.apps.benchmark import main

if __name__ == "__main__":
    main()
