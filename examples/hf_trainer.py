"""Hugging Face ``Trainer`` with torchmesa: one callback. A small GPT-2 built from its config
learns the standard library's own source.

    python examples/hf_trainer.py --steps 50
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import torchmesa
from torchmesa.apps.datasets import VOCAB, ByteBatches, stdlib_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    config.bos_token_id = config.eos_token_id = 0
    model = GPT2LMHeadModel(config)
    data = ByteBatches(stdlib_text(), seq=64)
    windows = [data.sample(1)[0][0] for _ in range(512)]
    train = [{"input_ids": ids, "labels": ids} for ids in windows]
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=10,
            report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=training, train_dataset=train,
            callbacks=[torchmesa.HFCallback()],  # the one line
        )  # fmt: skip
        result = trainer.train()
    print(
        f"trained {args.steps} steps with torchmesa: final training loss {result.training_loss:.4f}"
    )


if __name__ == "__main__":
    main()
