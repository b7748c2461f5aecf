"""`python -m engine.generate`: complete prompts with a DeepSeek-V3 checkpoint and print the new token ids.

stdout: one JSON line per prompt, `{"output_ids": [...]}` (plus `"text"` when a tokenizer decoded it); logs on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from engine.build import ModelSource, pick_dtype
from engine.distributed import EngineParallel, build_parallel_model
from engine.dp_balance import assign_ranks
from engine.cli_args import add_model_args, make_runner, setup_logging
from engine.errors import WideepError, run_cli
from engine.runner import Request
from engine.sampling import SamplingParams


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-ids", help='prompt token ids, e.g. "3 17 99"')
    src.add_argument("--prompts-file", help='JSONL file, one {"input_ids": [...]} per line')
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--logits-out", help="write the prompt's logits [prompt_len, vocab] float32 to this safetensors file")
    return p.parse_args(argv)


def parse_ids(text: str, where: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise WideepError(f"{where}: token ids must be integers separated by spaces, found {text!r}") from None
    if not ids:
        raise WideepError(f"{where}: no token ids given")
    return ids


def read_prompts_file(path: str) -> list[list[int]]:
    prompts = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise WideepError(f"--prompts-file {path}: cannot read it ({err.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)["input_ids"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WideepError(f'--prompts-file {path}, line {n}: expected {{"input_ids": [...]}}') from None
        if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
            raise WideepError(f"--prompts-file {path}, line {n}: 'input_ids' must be a non-empty list of ints")
        prompts.append(ids)
    if not prompts:
        raise WideepError(f"--prompts-file {path}: no prompts in it")
    return prompts


def load_tokenizer(source: ModelSource):
    path = source.path / "tokenizer.json" if source.path is not None else None
    if path is None or not path.is_file():
        raise WideepError(f"--prompt needs {source.name}/tokenizer.json; give token ids with --input-ids instead")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def write_logits(path: str, logits) -> None:
    """Writes atomically: a failed write leaves no partial file behind."""
    from safetensors.torch import save_file

    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"logits": logits.float().contiguous()}, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    source = ModelSource.resolve(args.model, args.num_layers)
    tokenizer = load_tokenizer(source) if args.prompt is not None else None
    if args.input_ids is not None:
        prompts = [parse_ids(args.input_ids, "--input-ids")]
    elif args.prompts_file is not None:
        prompts = read_prompts_file(args.prompts_file)
    else:
        prompts = [tokenizer.encode(args.prompt).ids]
    if args.logits_out and len(prompts) != 1:
        raise WideepError("--logits-out writes one prompt's logits; give a single prompt with --input-ids")
    if args.logits_out and not Path(args.logits_out).resolve().parent.is_dir():
        raise WideepError(f"--logits-out {args.logits_out}: its directory does not exist")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, ignore_eos=args.ignore_eos)
    par = EngineParallel.start(args)
    try:
        setup_logging(par.rank)
        model, eplb = build_parallel_model(args, source, par, pick_dtype(args.dtype, par.device))
        # DP attention: prompts spread by --load-balance-method (prompt 0, whose logits --logits-out wants, always
        # lands on rank 0: both methods give it the first rank).
        owner = assign_ranks([len(ids) + params.max_new_tokens for ids in prompts], par.world_size,
                             args.load_balance_method)
        mine = [Request(i, ids, params) for i, ids in enumerate(prompts) if owner[i] == par.rank]
        runner = make_runner(args, model, args.seed, par.sync, eplb.on_step_end)
        runner.generate(mine, prompt_logits=bool(args.logits_out))
        eplb.dump()
        gathered = par.sync.gather([(r.rid, r.output_ids) for r in mine])
        if par.is_main:
            if args.logits_out:
                write_logits(args.logits_out, mine[0].prompt_logits)
            outputs = dict(pair for part in gathered for pair in part)
            for i in range(len(prompts)):
                line = {"output_ids": outputs[i]}
                if tokenizer is not None:
                    line["text"] = tokenizer.decode(outputs[i])
                print(json.dumps(line), flush=True)
    finally:
        par.close()
    return 0


def cli() -> None:
    run_cli(main, sys.argv[1:])


if __name__ == "__main__":
    cli()
