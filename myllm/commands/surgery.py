"""``myllm surgery``: apply a replace (or an expert insertion) to a saved model directory and write the result.

    myllm surgery replace SRC OUT ffn moe --set n_experts=8 --set top_k=2 --set init=copy --layers 0-11
    myllm surgery add-experts SRC OUT 2 --top-k-new 1
    myllm surgery export SRC OUT          # a native architecture (e.g. Mixtral) plain transformers loads
    myllm surgery replace SRC OUT attention sdpa --targets 'model\\.layers\\.[0-3]\\.self_attn'

``--set KEY=VALUE`` values are parsed as JSON when possible (``8``, ``true``, ``1e-5``, ``{"switch": 0.01}``),
else kept as strings. The output directory is written atomically (a temporary sibling renamed at the end);
files of SRC that ``save_pretrained`` does not write (tokenizer, chat template ...) are copied over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from typing import Any


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]`` (single indices may be negative); None stays None."""
    if text is None:
        return None
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if span:
            out.extend(range(int(span.group(1)), int(span.group(2)) + 1))
        elif part:
            out.append(int(part))
    return out


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["n_experts=8", "init=copy"]`` -> ``{"n_experts": 8, "init": "copy"}``."""
    kwargs: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("surgery", help="apply a block replacement or expert insertion to a saved model")
    ops = p.add_subparsers(dest="op", metavar="OP", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src", help="model directory (save_pretrained format)")
    common.add_argument("out", help="output directory (must not exist, unless --overwrite)")
    common.add_argument("--layers", help="decoder layers, e.g. '0,2,4-7' (default: all)")
    common.add_argument("--dtype", default="auto", help="dtype to load and save in (default: the checkpoint's)")
    common.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    r = ops.add_parser("replace", parents=[common], help="myllm.factory.replace")
    r.add_argument("kind", choices=["attention", "ffn", "norm"])
    r.add_argument("name", help="registered block name (myllm.blocks.available(kind))")
    r.add_argument("--targets", help="module-path regex instead of --layers")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="block keyword")

    a = ops.add_parser("add-experts", parents=[common], help="myllm.surgery.add_experts")
    a.add_argument("n_new", type=int)
    a.add_argument("--top-k-new", type=int, default=1)
    a.add_argument("--init", default="copy", choices=["copy", "random"])
    a.add_argument("--no-freeze", action="store_true", help="do not freeze the existing experts")
    e = ops.add_parser("export", parents=[common], help="myllm.factory.export to a native architecture")
    e.set_defaults(layers=None)
    p.set_defaults(func=run)


def _write_atomically(model, src: str, out: str, overwrite: bool) -> None:
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".myllm-surgery-", dir=parent)
    try:
        model.save_pretrained(tmp)
        for name in os.listdir(src):
            path = os.path.join(src, name)
            if (
                os.path.isfile(path)
                and not os.path.exists(os.path.join(tmp, name))
                and not name.endswith((".safetensors", ".bin", ".index.json"))
            ):
                shutil.copy2(path, os.path.join(tmp, name))
        from myllm.data.io import replace_dir

        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import myllm
    from myllm import factory
    from myllm.factory import replace

    if not os.path.isdir(args.src):
        raise FileNotFoundError(f"no model directory at {args.src}")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.src, dtype=dtype)
    layers = parse_layers(args.layers)
    if args.op == "export":
        if os.path.exists(args.out) and not args.overwrite:
            raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
        target = factory.export(model, args.out)
        print(f"exported {type(model).__name__} as {target} to {args.out}")
        return 0
    if args.op == "replace":
        replace(model, args.kind, args.name, layers=layers, targets=args.targets, **parse_sets(args.sets))
    else:
        myllm.surgery.add_experts(
            model,
            args.n_new,
            layers=layers,
            init=args.init,
            top_k_new=args.top_k_new,
            freeze_existing=not args.no_freeze,
        )
    _write_atomically(model, args.src, args.out, args.overwrite)
    entry = model.config.myllm_surgeries[-1]
    print(f"{args.op}: {json.dumps({k: v for k, v in entry.items() if k != 'per_target'})}")
    print(f"wrote {type(model).__name__} ({model.config.model_type}) to {args.out}")
    return 0
