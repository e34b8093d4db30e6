"""DeepSpeed engine: equal to the torch engine under ZeRO-0 in one process; ZeRO-2/3 across 2 ranks (gloo, CPU).

Each test starts child processes (DeepSpeed initialises torch.distributed, which must not leak into the test
process); all share one fresh TORCH_EXTENSIONS_DIR per session, where DeepSpeed JIT-builds its CPU comm extension
once (~40 s). Wall times are printed (run pytest with -s to see them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from train_helpers import run_config, save_tiny_myllm_moe, subprocess_env
from utils import assert_close

WORKER = Path(__file__).with_name("ds_worker.py")
TIMEOUT = 600


def _run(tmp_path, env_dir, configs, nproc=1):
    paths = []
    for i, cfg in enumerate(configs):
        path = tmp_path / f"config{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(str(path))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), *paths]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            str(WORKER),
            str(out),
            *paths,
        ]
    env = subprocess_env(tmp_path)
    env["TORCH_EXTENSIONS_DIR"] = env_dir
    start = time.perf_counter()
    # a new session, so that on a timeout the launcher *and* its workers are killed
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"DeepSpeed run timed out after {TIMEOUT} s:\n{stderr[-4000:]}")
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
        pytest.fail(f"DeepSpeed run failed ({proc.returncode}):\n" + "\n".join(errors[-20:]) + proc.stderr[-3000:])
    print(f"\n[{nproc} process(es), {len(configs)} run(s)] wall time {wall:.1f} s")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(out, i, rank):
    return json.loads((out / f"{i}-rank{rank}.json").read_text()), load_file(str(out / f"{i}-rank{rank}.safetensors"))


@pytest.mark.slow
def test_zero0_matches_the_torch_engine(tmp_path, llama_dir, tokenizer_dir, text_data, torch_extensions_dir):
    """Same seed and data: equal losses (1e-5, fp32) over 10 steps, with accumulation, clipping and warmup."""
    common = dict(
        train={"max_steps": 10, "micro_batch_size": 2, "grad_accum": 2, "grad_clip": 1.0},
        schedule={"kind": "cosine", "warmup_steps": 2},
        optimizer={"lr": 3e-3, "weight_decay": 0.1},
    )
    torch_cfg = run_config(tmp_path / "t", llama_dir, tokenizer_dir, text_data, **common)
    ds_cfg = run_config(
        tmp_path / "d",
        llama_dir,
        tokenizer_dir,
        text_data,
        **common,
        engine={"kind": "deepspeed", "zero_stage": 0, "device": "cpu"},
    )
    out = _run(tmp_path, torch_extensions_dir, [torch_cfg, ds_cfg])
    (ref, ref_params), (got, got_params) = _result(out, 0, 0), _result(out, 1, 0)
    assert [r["step"] for r in got["records"]] == list(range(1, 11))
    for a, b in zip(ref["records"], got["records"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["lr"] == b["lr"]
    assert max(r["grad_norm"] for r in ref["records"]) > 1.0  # clipping was active
    for name, p in ref_params.items():
        assert_close(got_params[name], p, atol=1e-5)


# ------------------------------------------------------------------------------------- two ranks, gloo, CPU
LORA = {"r": 2, "target_modules": ["q_proj", "v_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}
MOE_SECTIONS = dict(
    train={"max_steps": 5, "micro_batch_size": 2, "grad_accum": 1},
    schedule={"kind": "cosine", "warmup_steps": 1},
    checkpoint={"every": 3},
)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tokenizer_dir, text_data, torch_extensions_dir):
    """A small MyLLM MoE model (shared expert, Switch + aux-loss-free balancing) pretrained for 5 steps under ZeRO-2
    and under ZeRO-3 by 2 ranks, and with LoRA (attention and fused experts) under ZeRO-3; all three in one
    torchrun."""
    tmp = tmp_path_factory.mktemp("zero")
    model_dir = save_tiny_myllm_moe(tmp / "moe")
    configs = [
        run_config(
            tmp / name,
            model_dir,
            tokenizer_dir,
            text_data,
            **MOE_SECTIONS,
            engine={"kind": "deepspeed", "zero_stage": stage, "device": "cpu"},
            **extra,
        )
        for name, stage, extra in (("z2", 2, {}), ("z3", 3, {}), ("lora3", 3, {"lora": LORA}))
    ]
    return tmp, model_dir, configs, _run(tmp, torch_extensions_dir, configs, nproc=2)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2], ids=["zero2", "zero3", "lora-zero3"])
def test_two_ranks_complete_and_hold_identical_parameters(zero_runs, index):
    _, model_dir, _, out = zero_runs
    (info0, params0), (info1, params1) = _result(out, index, 0), _result(out, index, 1)
    assert info0["world_size"] == 2 and [r["step"] for r in info0["records"]] == [1, 2, 3, 4, 5]
    timing = {"tokens_per_s"}  # each rank times itself; every other value is reduced over both ranks
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in info["records"]] for info in (info0, info1)]
    assert strip[0] == strip[1] and "aux" in strip[0][0]
    assert info0["records"][-1]["tokens"] == 5 * 2 * 2 * 32  # each rank reads its own windows
    assert params0.keys() == params1.keys() and len(params0) > 0
    for name, p in params0.items():
        assert torch.equal(p, params1[name]), name
    if index == 2:  # LoRA: the adapters moved (B starts at zero), nothing else did
        lora_b = [p for n, p in params0.items() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
        start = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        for name, p in params0.items():
            if "lora_" not in name:
                base = name.removeprefix("model.base_model.model.").replace(".base_layer", "")
                assert torch.equal(p, start[base]), name
        return
    start = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    moved = [n for n, p in start.named_parameters() if not torch.equal(p, params0[f"model.{n}"])]
    assert any("experts" in n for n in moved) and any("gate" in n for n in moved)  # experts and router trained
    biases = [n for n in params0 if n.endswith("e_score_correction_bias")]
    assert biases and all(params0[n].abs().sum() > 0 for n in biases)  # aux-loss-free updates, equal on both ranks


@pytest.mark.slow
def test_zero2_and_zero3_agree(zero_runs):
    """Same first step; afterwards close but not bit-equal: ZeRO-3's own linear kernel changes float rounding, a
    near-tied token then picks another expert, and the sign-based aux-loss-free update amplifies that flip."""
    _, _, _, out = zero_runs
    (z2, _), (z3, _) = _result(out, 0, 0), _result(out, 1, 0)
    assert abs(z2["records"][0]["loss"] - z3["records"][0]["loss"]) < 1e-5
    for a, b in zip(z2["records"], z3["records"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-3


@pytest.mark.slow
def test_zero3_checkpoint_resumes_and_exports_a_consolidated_hf_model(zero_runs, torch_extensions_dir):
    tmp, _, configs, out = zero_runs
    full, params = _result(out, 1, 0)
    exported = transformers.AutoModelForCausalLM.from_pretrained(full["final_dir"])
    for name, p in exported.named_parameters():  # the consolidated export holds the trained, gathered weights
        assert torch.equal(p, params[f"model.{name}"]), name
    ckpt = Path(configs[1]["output_dir"]) / "checkpoints" / "step-00000003"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "rank1.json").is_file()
    resume = {**configs[1], "output_dir": str(tmp / "resumed"), "checkpoint": {"every": 3, "resume": str(ckpt)}}
    (tmp / "again").mkdir()
    out2 = _run(tmp / "again", torch_extensions_dir, [resume], nproc=2)
    info, _ = _result(out2, 0, 0)
    assert [(r["step"], r["loss"]) for r in info["records"]] == [(r["step"], r["loss"]) for r in full["records"][3:]]
    resumed = transformers.AutoModelForCausalLM.from_pretrained(info["final_dir"])
    for (name, p), q in zip(exported.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.slow
def test_lora_under_zero3_exports_adapter_and_merged_model(zero_runs):
    _, model_dir, configs, out = zero_runs
    info, _ = _result(out, 2, 0)
    run = Path(configs[2]["output_dir"])
    merged = transformers.AutoModelForCausalLM.from_pretrained(info["final_dir"])
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir), run / "adapter"
    )
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    assert (merged(input_ids=ids).logits - base).abs().max() > 1e-4
