"""fisherlora, then TRL's SFTTrainer: initialise from Fisher information, fine-tune, convert.

    .venv/bin/fisherlora init                                    # the quick start (or let this script run it)
    .venv/bin/python examples/sft_trl.py --init fisherlora-out --trained trained --max-steps 20
    .venv/bin/fisherlora convert fisherlora-out trained -o plain # a plain LoRA (rank 2r) for the original base

    .venv/bin/python examples/sft_trl.py --tiny --max-steps 2              # all of it on a tiny random model (CI)

The adapter is loaded trainable on the ORIGINAL base (`fisherlora.load(..., is_trainable=True)`)
before the trainer builds its optimizer; nothing else is needed (no callback). The training data
here is GSM8K as TRL's prompt-completion format (the loss on the completion only).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="the base model (as for `fisherlora init`)")
    p.add_argument("--data", default="gsm8k", help="training pairs question/answer (as for `fisherlora init`)")
    p.add_argument("--init", default="fisherlora-out", help="the output of `fisherlora init` (run if missing)")
    p.add_argument("--trained", default="trained", help="where the trained adapter is saved")
    p.add_argument("--max-steps", type=int, default=20, help="training steps (default: %(default)s)")
    p.add_argument("--train-samples", type=int, default=64, help="training pairs (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=128,
                   help="calibration pairs, when this script runs `fisherlora init` itself (default: %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random chat model and 8 calibration pairs, in a temporary folder removed at the end "
                        "(CI size)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # This program reads local files only (the embedded model and data): it says so to the Hugging
    # Face libraries, so that none of them tries the Hub (bitsandbytes, imported by PEFT, would ask
    # it for an optional CPU kernel). A program of yours that needs the Hub leaves this out.
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(switch, "1")
    with tempfile.TemporaryDirectory(prefix="fisherlora-sft-") as scratch:
        return run(args, Path(scratch) if args.tiny else Path("."))


def run(args, work: Path) -> int:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import fisherlora
    from fisherlora import cli
    from fisherlora.data import load_model_and_tokenizer, load_records

    init_flags = ["--num-samples", str(args.num_samples)]
    if args.tiny:
        from fisherlora.testing import save_tiny_chat_model

        args.model = str(save_tiny_chat_model(work / "tiny-model"))
        args.init, args.trained = str(work / "init"), str(work / "trained")
        init_flags = ["--num-samples", "8", "--max-length", "512", "--rank", "4", "--backend", "torch"]
    # 1. fisherlora init (the command; the same as typing it)
    if not (Path(args.init) / "fisherlora.json").exists():
        if cli.main(["init", "--model", args.model, "--data", args.data, "-o", args.init, "--quiet", *init_flags]):
            return 1
    # 2. the adapter on the ORIGINAL base, trainable
    base, tok = load_model_and_tokenizer(args.model, dtype=torch.float32)
    model = fisherlora.load(base, args.init, is_trainable=True)
    # 3. TRL: prompt-completion records, the loss on the completion
    rows = load_records(args.data, num_samples=args.train_samples, seed=1, prompt_field="question",
                        response_field="answer")
    train = Dataset.from_dict({"prompt": [str(q) for q in rows["question"]],
                               "completion": [str(a) for a in rows["answer"]]})
    # SFTConfig trains in bf16 by default; a CPU without native bf16 matrix units emulates it, several
    # times slower (one step here: about 170 s in bf16, 40 s in float32, both on a loaded 2-core
    # machine, so not a benchmark), so bf16 only on a GPU
    gpu = torch.cuda.is_available()
    config = SFTConfig(output_dir=str(work / "sft-run"), max_steps=args.max_steps, per_device_train_batch_size=2,
                       learning_rate=2e-4, logging_steps=1, save_strategy="no", report_to=[],
                       max_length=256, use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported())
    print(f"training on the {'GPU' if gpu else 'CPU'} in {'bf16' if config.bf16 else 'float32'}")
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tok)
    trainer.train()
    model.save_pretrained(args.trained)
    print(f"trained adapter saved to {args.trained!r}; next: fisherlora convert {args.init} {args.trained} -o plain")
    if args.tiny:  # the last step of the walk-through, here too
        return cli.main(["convert", args.init, args.trained, "-o", str(work / "plain"), "--model", args.model])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
