"""Generate text from a trained HGRN2 checkpoint, streaming tokens as they come.

    python examples/generate.py out/tiny --prompt "def fibonacci(n):"
    python examples/generate.py path/to/hgrn2-1.3B-100B --prompt "The capital of France" --top-p 0.9

The checkpoint is a directory with config.json + model.safetensors (this library's or fla's), or
a training output directory (its `latest` checkpoint is used). The tokenizer is the directory's
tokenizer.json unless --tokenizer names another. Decoding is the model's recurrent step: memory
stays constant however many tokens are generated.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from hgrn2mini import HGRN2ForCausalLM

EOT = "<|endoftext|>"  # this library's document separator (examples/data.py)


def resolve_checkpoint(path: str | Path) -> Path:
    """A model directory, or a training output directory whose `latest` names one."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    pointer = path / "latest"
    if pointer.is_file():
        return path / pointer.read_text().strip()
    raise FileNotFoundError(
        f"checkpoint {str(path)!r} must be a directory with config.json, or a training output "
        f"directory with a 'latest' file; found neither"
    )


def find_tokenizer(checkpoint: Path, explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else [checkpoint / "tokenizer.json", checkpoint.parent / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"--tokenizer: no tokenizer.json found (looked at {', '.join(map(str, candidates))}); "
        f"pass --tokenizer PATH"
    )


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt; an empty prompt starts from a document boundary."""
    ids = tokenizer.encode(prompt).ids  # adds BOS where the tokenizer's post-processor says so (fla's)
    if ids:
        return ids
    for special in (EOT, "<s>"):  # ours, then LLaMA-style tokenizers as fla's checkpoints use
        if (tid := tokenizer.token_to_id(special)) is not None:
            return [tid]
    raise ValueError("--prompt is empty and the tokenizer has no <|endoftext|> or <s> token to start from")


def stream(
    model: HGRN2ForCausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_at_eot: bool = True,
) -> Iterator[str]:
    """Yields the decoded text as it grows, piece by piece (the prompt itself is not yielded)."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)
    if max(ids) >= model.config.vocab_size:
        raise ValueError(
            f"--tokenizer gives ids up to {max(ids)}, but the model's vocab_size is {model.config.vocab_size}: "
            f"wrong tokenizer for this checkpoint?"
        )
    eot = tokenizer.token_to_id(EOT)
    new: list[int] = []
    shown = ""
    x = torch.tensor([ids], device=device)
    for token in model.generate(x, max_new_tokens, temperature, top_k, top_p, generator):
        t = int(token[0])  # the host needs each token to print it anyway
        if stop_at_eot and t == eot:
            break
        new.append(t)
        text = tokenizer.decode(new)
        # A byte-level token can end inside a multi-byte character: hold it back until complete.
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        yield text[len(shown) :]
        shown = text
    text = tokenizer.decode(new)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown) :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model directory (config.json + model.safetensors) or training --out-dir")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: as stored)")
    args = p.parse_args(argv)
    try:
        directory = resolve_checkpoint(args.checkpoint)
        tokenizer = Tokenizer.from_file(str(find_tokenizer(directory, args.tokenizer)))
    except FileNotFoundError as e:
        p.error(str(e))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = HGRN2ForCausalLM.from_pretrained(directory, device=args.device, dtype=dtype).eval()
    generator = torch.Generator(args.device).manual_seed(args.seed)
    print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    try:
        for piece in stream(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, generator):
            print(piece, end="", flush=True)
    except ValueError as e:
        p.error(str(e))
    print(flush=True)
    print(f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
