"""Every example script runs in its quick form, and what it claims holds in the files it writes.

Each script runs in a child process (``python examples/<name>.py --quick --out DIR``) with this checkout on
``PYTHONPATH``; the checks reload its outputs (exported models, adapters, metrics) and recompute its numbers.
The pretraining example's model is the base of the SFT, distillation and upcycling examples (``--base``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers

import myllm  # noqa: F401  (registers myllm's model types with the Auto classes)
from myllm.data import load_tokenizer
from myllm.eval import perplexity
from myllm.train import load_config, read_metrics
from myllm.train.engines.deepspeed_engine import build_ds_config
from myllm.train.modeling import load_model

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TIMEOUT = 600


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREPARE = _import(EXAMPLES / "deepspeed" / "prepare.py")  # the overrides launch.sh passes to `myllm train`


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> str:
    """One fresh TORCH_EXTENSIONS_DIR per session (unless the CI script set one): DeepSpeed JIT-builds its CPU
    comm extension there once, and a stale lock of a killed build can never hang a later run."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))


def _env(extensions: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(TORCH_EXTENSIONS_DIR=extensions, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run ``cmd`` in its own session (a timeout kills it and its children); fail with its output's tail."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:3])} timed out after {TIMEOUT} s:\n{output[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{output[-4000:]}")
    return output


def run_example(name: str, out: Path, extensions: str, *args: str) -> dict:
    """Run ``examples/<name>.py --quick --out OUT ARGS`` and return its ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out), *args], out, _env(extensions))
    return json.loads((out / "results.json").read_text())


def heldout(out: Path) -> list[str]:
    """The held-out documents the quick examples evaluate on (the first 40)."""
    lines = (out / "data" / "heldout.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line][:40]


def load(path: str | Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, torch_extensions_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretrain")
    return out, run_example("pretrain", out, torch_extensions_dir)


@pytest.fixture(scope="module")
def probe(pretrained) -> torch.Tensor:
    out, _ = pretrained
    tok = load_tokenizer(out / "final")
    ids = tok(" ".join(heldout(out)[:4]), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:96]).view(2, 48)


def test_pretrain_lowers_heldout_perplexity_and_its_export_reproduces_it(pretrained):
    out, res = pretrained
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == res["steps"] == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert res["ppl_after"] < 0.8 * res["ppl_before"]
    # the exported directory loads with plain transformers and gives the logged perplexity
    model, tok = load(out / "final"), transformers.AutoTokenizer.from_pretrained(out / "final")
    again = perplexity(model, tok, heldout(out), **res["window"])
    assert again["ppl"] == pytest.approx(res["ppl_after"], rel=1e-6)
    assert again["tokens"] == res["heldout_tokens"]
    cfg = load_config(out / "run.yaml")  # the YAML a user reruns with `myllm train`
    assert Path(cfg.output_dir) == out.resolve() and cfg.train.max_steps == 40


def test_sft_lora_adapter_equals_the_merged_model_and_lowers_the_answer_loss(
    pretrained, probe, tmp_path, torch_extensions_dir
):
    base_dir = pretrained[0] / "final"
    res = run_example("sft_lora", tmp_path / "sft", torch_extensions_dir, "--base", str(base_dir))
    adapter, merged_dir = Path(res["adapter_dir"]), Path(res["merged_dir"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert res["trainable_parameters"] < res["parameters"] / 2
    with_adapter = peft.PeftModel.from_pretrained(load(base_dir), adapter).eval()
    merged, base = load(merged_dir), load(base_dir)
    torch.testing.assert_close(logits(merged, probe), logits(with_adapter, probe), rtol=1e-5, atol=1e-5)
    assert (logits(merged, probe) - logits(base, probe)).abs().max() > 1e-3  # the adapter changed the model
    assert res["answer_loss_after"] < res["answer_loss_before"]
    assert len(res["answers"]) == 3


def test_a_base_that_is_not_a_model_is_refused_before_anything_is_written(tmp_path, torch_extensions_dir):
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    cmd = [sys.executable, str(EXAMPLES / "sft_lora.py"), "--quick", "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [*cmd, "--base", str(tmp_path / "not-a-model")],
        cwd=tmp_path,
        env=_env(torch_extensions_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2
    assert "not a model directory with its tokenizer (no tokenizer_config.json)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_distillation_trains_kd_and_hidden_terms_into_a_smaller_student(pretrained, tmp_path, torch_extensions_dir):
    out = tmp_path / "distill"
    res = run_example("distill", out, torch_extensions_dir, "--base", str(pretrained[0] / "final"))
    kd = res["distilled"]
    assert kd["parameters"] < res["teacher_parameters"] / 2
    assert kd["last"]["kd"] < kd["first"]["kd"] and kd["last"]["hidden"] < kd["first"]["hidden"]
    assert "kd" not in res["baseline"]["last"] and "hidden" not in res["baseline"]["last"]
    history = read_metrics(out / "distilled" / "metrics.jsonl")
    assert len(history) == res["steps"] and all({"ce", "kd", "hidden"} <= set(r) for r in history)
    student, tok = load(kd["final_dir"]), load_tokenizer(kd["final_dir"])
    again = perplexity(student, tok, heldout(out), **res["window"])["ppl"]
    assert again == pytest.approx(kd["ppl"], rel=1e-6)


def test_upcycling_keeps_the_logits_then_the_moe_trains(pretrained, probe, tmp_path, torch_extensions_dir):
    base_dir = pretrained[0] / "final"
    res = run_example("upcycle_moe", tmp_path / "up", torch_extensions_dir, "--base", str(base_dir))
    assert res["max_logit_diff_upcycled"] < 1e-4 and res["max_logit_diff_reloaded"] < 1e-4
    base, upcycled, trained = load(base_dir), load(res["upcycled_dir"]), load(res["moe"]["final_dir"])
    assert upcycled.config.ffn["name"] == "moe" and upcycled.config.ffn["n_experts"] == 4
    torch.testing.assert_close(logits(upcycled, probe), logits(base, probe), rtol=1e-4, atol=1e-4)
    assert (logits(trained, probe) - logits(base, probe)).abs().max() > 1e-3  # the check can fail
    moe = res["moe"]
    assert moe["parameters"] > res["dense"]["parameters"]
    assert moe["last_loss"] < moe["first_loss"]
    assert set(moe["expert_load_last"]) == {f"model.layers.{i}.mlp" for i in range(2)}
    assert all(len(counts) == 4 and sum(counts) > 0 for counts in moe["expert_load_last"].values())


def test_inserted_experts_train_while_the_old_ones_stay_bit_identical(tmp_path, torch_extensions_dir):
    out = tmp_path / "insert"
    res = run_example("insert_experts", out, torch_extensions_dir)
    n_old, n_new = res["n_old"], res["n_new"]
    assert res["max_logit_diff_at_insertion"] < 1e-6
    assert res["frozen_rows_bit_identical"] and res["frozen_rows_max_abs_change"] == 0.0
    # loaded models hold the fused expert layout (plain Qwen3-MoE checkpoints store one tensor per expert)
    base, grown, final = (load(out / d).state_dict() for d in ("base/final", "grown", "sft/final"))
    keys = [k for k in base if k.endswith(("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"))]
    assert len(keys) == 3 * 2
    for key in keys:
        assert final[key].shape[0] == base[key].shape[0] + n_new == n_old + n_new
        assert torch.equal(final[key][:n_old], base[key]), f"{key}: an old expert row changed"
        assert not torch.equal(final[key][n_old:], grown[key][n_old:]), f"{key}: the new experts did not train"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final[q], base[q])  # the rest of the model trained
    assert res["answer_loss_after"] < res["answer_loss_before"]


@pytest.mark.slow
def test_deepspeed_launch_trains_on_two_cpu_processes(tmp_path, torch_extensions_dir):
    out = tmp_path / "ds"
    env = _env(torch_extensions_dir) | {"OUT": str(out), "NPROC": "2", "PYTHON": sys.executable}
    _run(["bash", str(EXAMPLES / "deepspeed" / "launch.sh"), "--quick"], tmp_path, env)
    history = read_metrics(out / "metrics.jsonl")
    # 2 ranks x grad_accum 2 (run.yaml) x micro-batch 4 x 64 tokens per step
    assert [r["step"] for r in history] == [1, 2, 3]
    assert [r["tokens"] for r in history] == [1024, 2048, 3072]
    trained = load(out / "final")
    sets = [f"{k}={v}" for k, v in PREPARE.overrides(out, quick=True).items()]
    cfg = load_config(EXAMPLES / "deepspeed" / "run.yaml", sets)
    initial = load_model(cfg.model, seed=cfg.train.seed)  # what the run started from
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, initial.get_parameter(n))]
    assert moved, "training did not change the model"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_sample_config_merges_with_the_full_run(tmp_path, stage):
    """The full form's run.yaml and ds_config.json agree (8 GPUs, bf16): nothing conflicts, the autos are set."""
    sets = [f"output_dir={tmp_path}", f"data.path={tmp_path / 'train.jsonl'}", f"model.tokenizer={tmp_path}"]
    cfg = load_config(EXAMPLES / "deepspeed" / "run.yaml", [*sets, f"engine.zero_stage={stage}"])
    ds = build_ds_config(cfg, world_size=8, bf16=True)
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8
    assert ds["gradient_clipping"] == cfg.train.grad_clip
