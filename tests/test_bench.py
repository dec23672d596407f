"""
The benchmark scripts, end to end on the CPU with the tiny preset and a synthetic dataset:
they launch real train.py runs and write well-formed JSON, Markdown and PNG files. Also
their two pieces of arithmetic: the spike counter and the exponential fit of L(T).
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import before_after  # noqa: E402
import common  # noqa: E402
import ddp  # noqa: E402
import loops  # noqa: E402
import quality  # noqa: E402
import scaling  # noqa: E402
import stability  # noqa: E402
import throughput  # noqa: E402

SWEEP_MODELS, RATES = ["gpt", "parcae"], [2e-3, 16e-3]
QUALITY_MODELS = ["gpt", "gpt_2x", "parcae"]

# -----------------------------------------------------------------------------
# the arithmetic


def test_a_falling_loss_has_no_spikes():
    losses = 3 + 8 * np.exp(-np.arange(100) / 10) + 0.05 * np.sin(np.arange(100))
    assert common.count_spikes(losses) == 0


def test_an_injected_spike_counts_once_even_when_it_lasts():
    losses = list(3 + 8 * np.exp(-np.arange(100) / 10))
    one = losses.copy()
    one[60] += 1.0
    assert common.count_spikes(one) == 1
    long = losses.copy()
    for i in range(60, 64):        # four logged points above: still one spike
        long[i] += 1.0
    assert common.count_spikes(long) == 1
    two = one.copy()
    two[80] += 1.0
    assert common.count_spikes(two) == 2
    assert common.count_spikes(one, margin=2.0) == 0     # below the margin it is noise


def test_the_fit_recovers_a_known_saturating_exponential():
    T = np.array([1, 2, 4, 6, 8, 12, 16, 24, 32])
    fit = loops.fit_exponential(T, 3.2 + 1.5 * np.exp(-0.4 * T))
    # z is the nearest point of the last grid: 400 log-spaced points over [0.001, 5] are 2.2 % apart,
    # and each of 3 zooms spaces 101 points over 2 steps, 50 times finer: 2.2 %/50³ ≈ 1.7e-7 apart.
    # L∞ and Z, fitted exactly at that z, move less than it does (a few 1e-8 here), and the SSE of a
    # z that far off is below 1e-13.
    assert fit["z"] == pytest.approx(0.4, rel=1.7e-7)
    assert fit["L_inf"] == pytest.approx(3.2, abs=1e-6) and fit["Z"] == pytest.approx(1.5, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)


def test_the_fit_of_noisy_points_is_the_least_squares_one():
    """With noise, the fit must do at least as well as the curve that made the points (least squares can
    only go lower), and its SSE and R² must be what its own residuals give. Computed another way, each
    residual moves by a few float64 ulps of L (~1e-15), so the SSE by under 2·Σ|r|·1e-15 < 1e-13. The
    grid's z is within 1.7e-7 of the best one (see above): its excess error is second order in that,
    far below the 1e-12 allowed against the truth."""
    T = np.array([1, 2, 4, 8, 16, 32])
    truth = 3 + np.exp(-0.3 * T)
    L = truth + np.random.default_rng(0).normal(0, 0.02, len(T))
    fit = loops.fit_exponential(T, L)
    curve = fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * T)
    sse = ((curve - L) ** 2).sum()
    assert sse == pytest.approx(fit["sse"], rel=0, abs=1e-13)
    assert sse <= ((truth - L) ** 2).sum() + 1e-12
    assert fit["r2"] == pytest.approx(1 - sse / ((L - L.mean()) ** 2).sum(), rel=0, abs=1e-12)
    assert 0.9 < fit["r2"] < 1                          # noise of 0.02 on a fall of 0.74: a good fit, not a perfect one


def test_the_fit_of_flat_points_is_flat():
    T = np.array([1, 2, 4, 8, 16, 32])
    fit = loops.fit_exponential(T, np.full(len(T), 3.0))
    curve = fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * T)
    assert np.abs(curve - 3.0).max() < 1e-12 and fit["r2"] == 1.0


@pytest.mark.parametrize("injection", ["parcae", "linear", "add"])
def test_the_adaptive_bench_counts_each_injections_own_flops(injection):
    """bench/loops.py's forward FLOPs are the model's count, whatever the injection (W [h; e] costs 4d² a
    token, B e 2d², h + e nothing), and the KL criterion's extra readout (C, coda, head) is what PyTorch's
    FLOP counter finds in them, plus the causal attention it skips on a CPU (2·L·d per coda block)."""
    from conftest import tiny
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny(injection, n_coda=2)
    c, d = model.config, model.config.n_embd
    add = tiny("add", n_coda=2)
    extra = {"parcae": 2 * d * d, "linear": 4 * d * d, "add": 0}[injection]
    for T in (1, 3, 2.5):
        assert loops.forward_flops(model, T) == model.flops_per_token(loops=T, backward=False)
        assert loops.forward_flops(model, T) - loops.forward_flops(add, T) == T * extra
    L = c.block_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, L, dtype=torch.long), loops=1)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    looping = sum(n for name, n in counts.items() if re.fullmatch(r"GPT\.(prelude\.\d+|core\.\d+|injection)", name))
    counted = (counts["Global"] - looping) / L
    assert loops.readout_flops(model) == counted + c.n_coda * 2 * L * d
    assert loops.forward_flops(model, 3, readout=100) == loops.forward_flops(model, 3) + 2 * 100


def write_run(out_dir, losses, status, val=None, max_iters=None):
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        for i, x in enumerate(losses):
            f.write(json.dumps({"step": 5 * i, "loss": x, "state_norm": 10.0 + i, "a_max": 0.5}) + "\n")
        if val is not None:
            f.write(json.dumps({"step": max_iters, "val_loss": {"4": val}}) + "\n")
    settings = {"max_iters": max_iters or 5 * len(losses), "mean_loops": 4}
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump({"status": status, "settings": settings, "wall_s": 1.0}, f)
    return settings


def test_a_run_diverged_if_it_stopped_on_a_nan_or_ends_above_its_initial_loss(tmp_path):
    s = write_run(tmp_path / "nan", [11.0, 9.0, 30.0], "diverged")
    assert common.summarize(str(tmp_path / "nan"), s)["diverged"] is True
    s = write_run(tmp_path / "up", [11.0, 6.0, 11.5], "finished", val=11.4, max_iters=15)
    r = common.summarize(str(tmp_path / "up"), s)
    assert r["diverged"] is True and r["spikes"] == 1
    s = write_run(tmp_path / "ok", [11.0, 6.0, 5.0], "finished", val=4.9, max_iters=15)
    r = common.summarize(str(tmp_path / "ok"), s)
    assert r["diverged"] is False and r["final_val_loss"] == 4.9 and r["max_state_norm"] == 12.0


def test_train_py_stopping_on_a_nan_is_a_divergence_and_a_traceback_a_failure(tmp_path):
    os.makedirs(tmp_path / "a")
    (tmp_path / "a" / "train.log").write_text("step 0 | loss 11.0\nstopped at step 7: the training loss is nan "
                                              "(no checkpoint was saved)\n")
    assert common.classify(1, str(tmp_path / "a"), 100) == "diverged"
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "train.log").write_text("Traceback (most recent call last):\ntorch.OutOfMemoryError: ...\n")
    assert common.classify(1, str(tmp_path / "b"), 100) == "failed"

# -----------------------------------------------------------------------------
# end to end: stability -> quality -> loops, tiny preset, real train.py runs


@contextlib.contextmanager
def one_cpu_thread():
    """The train.py runs (common.run_all leaves OMP_NUM_THREADS as it is) and this process on one CPU
    thread: a matmul's rounding depends on how many threads split its sums, so this way an evaluation
    here of a run's checkpoint computes the run's own numbers, to the last bit."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(toy_data, tmp_path_factory):
    """Runs the three scripts once, in order, as a user would; returns their folders and results."""
    root = tmp_path_factory.mktemp("bench")
    common_args = ["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(root / "work"),
                   "--results_dir", str(root / "results"), "--parallel", "2"]
    with one_cpu_thread():
        sweep = stability.main(common_args + ["--models", *SWEEP_MODELS, "--rates", *map(str, RATES)])
        qual = quality.main(common_args + ["--models", *QUALITY_MODELS, "--reuse_sweep"])
        depth = loops.main(common_args)
    return {"args": common_args, "results": root / "results", "work": root / "work",
            "stability": sweep, "quality": qual, "loops": depth}


def test_the_sweep_has_one_well_formed_entry_per_model_and_rate(bench):
    with open(bench["results"] / "stability.json") as f:
        sweep = json.load(f)
    assert sorted((r["model"], r["lr"]) for r in sweep["runs"]) == sorted(
        (m, lr) for m in SWEEP_MODELS for lr in RATES)
    for r in sweep["runs"]:
        assert r["status"] == "finished"
        assert type(r["diverged"]) is bool and type(r["spikes"]) is int
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < r["initial_loss"]
        assert len(r["curve"]["step"]) == len(r["curve"]["loss"]) > 1
        assert r["params"] > 0 and r["flops_per_token"] > 0
        looped = r["model"] == "parcae"
        assert (r["max_state_norm"] is not None) == looped
        if looped:
            assert 0 < r["max_a_max"] < 1         # Parcae's Ā stays in (0, 1)
    for name in ("stability_loss.png", "stability_state.png"):
        assert (bench["results"] / name).stat().st_size > 1000
    table = (bench["results"] / "stability.md").read_text()
    for m in SWEEP_MODELS:
        for lr in RATES:
            assert table.count(f"| {m} | {lr:g} |") == 1


def test_a_second_sweep_skips_the_runs_that_ended(bench, capsys):
    capsys.readouterr()
    again = stability.main(bench["args"] + ["--models", *SWEEP_MODELS, "--rates", *map(str, RATES)])
    out = capsys.readouterr().out
    assert out.count("earlier, skipped") == len(SWEEP_MODELS) * len(RATES)
    assert "[1/" not in out                       # nothing was trained
    assert [r["final_val_loss"] for r in again["runs"]] == [r["final_val_loss"] for r in bench["stability"]["runs"]]


def test_quality_reuses_the_sweep_and_compares_at_each_budget(bench):
    with open(bench["results"] / "quality.json") as f:
        q = json.load(f)
    budgets = common.PRESETS["tiny"]["budgets"]
    assert q["budgets"] == budgets
    assert sorted((r["model"], r["budget"]) for r in q["runs"]) == sorted(
        (m, b) for m in QUALITY_MODELS for b in budgets)
    best = stability.best_rates(bench["stability"])
    for r in q["runs"]:
        assert r["status"] == "finished" and r["val_ppl"] == math.exp(r["val_loss"])
        assert r["lr"] == best["gpt" if r["model"] == "gpt_2x" else r["model"]]["lr"]
        # the sweep ran the first budget of gpt and parcae already; gpt_2x and the second budget are new
        assert r["reused_sweep_run"] == (r["budget"] == budgets[0] and r["model"] != "gpt_2x")
        assert r["train_flops"] == r["flops_per_token"] * r["tokens"]
        if r["model"] == "gpt":
            assert r["ppl_ratio_to_gpt"] == 1.0 and r["relative_quality"] is None
        if r["model"] == "parcae":
            assert math.isfinite(r["relative_quality"]) and r["flops_ratio_to_gpt"] > 1
    assert (bench["results"] / "quality.png").stat().st_size > 1000
    assert len([line for line in (bench["results"] / "quality.md").read_text().splitlines()
                if line.startswith("| ") and "model" not in line]) == len(q["runs"])


def test_loops_evaluates_every_depth_and_fits_the_curve(bench):
    with open(bench["results"] / "loops.json") as f:
        depth = json.load(f)
    preset = common.PRESETS["tiny"]
    assert [m["model"] for m in depth["models"]] == ["parcae"]    # the looped model of the largest budget
    m = depth["models"][0]
    assert sorted(map(int, m["losses"])) == preset["loops"]
    assert all(math.isfinite(v) for v in m["losses"].values())
    fit = m["fit"]      # the fit is of these points: its SSE is what its curve leaves of them (see above)
    T = np.array(sorted(map(int, m["losses"])))
    curve = fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * T)
    assert ((curve - np.array([m["losses"][str(t)] for t in T])) ** 2).sum() == pytest.approx(fit["sse"], rel=0, abs=1e-13)
    # the same batches as training's own evaluation: at T = μ_rec it is the run's final val loss
    q = next(r for r in bench["quality"]["runs"] if r["model"] == "parcae" and r["budget"] == max(preset["budgets"]))
    assert m["losses"][str(preset["mean_loops"])] == q["val_loss"]
    assert (bench["results"] / "loops.png").stat().st_size > 1000
    assert "| parcae |" in (bench["results"] / "loops.md").read_text()


def test_loops_refuses_a_checkpoint_trained_on_other_data(bench, toy_data, tiny_data, tmp_path):
    """Another vocabulary, or one of the same size whose ids are other characters: both are other tokens."""
    checkpoint = bench["loops"]["models"][0]["checkpoint"]
    same_size = tmp_path / "same_size"
    shutil.copytree(toy_data, same_size)
    meta = json.loads((same_size / "meta.json").read_text())
    (same_size / "meta.json").write_text(json.dumps({**meta, "chars": [chr(65 + i) for i in range(63)]}))
    for data, vocab in ((tiny_data, r"\d+"), (same_size, "64")):
        with pytest.raises(SystemExit, match=r"was trained on char tokens \(vocab 64\), but .* holds other tokens, "
                                             rf"char tokens \(vocab {vocab}\): pass the --data_dir it was trained on"):
            loops.main(["--data_dir", str(data), "--preset", "tiny", "--results_dir", str(tmp_path),
                        "--checkpoints", checkpoint])


def test_loops_adaptive_measures_exit_against_fixed_depth_on_the_same_batches(bench):
    checkpoint = bench["loops"]["models"][0]["checkpoint"]
    with one_cpu_thread():      # as the plain loops bench ran
        result = loops.main(bench["args"] + ["--adaptive", "--checkpoints", checkpoint, "--cap", "4",
                                             "--thresholds", "0.3", "0.05", "0", "--decode_batches", "1"])
    r = result["models"][0]
    preset = common.PRESETS["tiny"]
    assert r["cap"] == 4 and sorted(map(int, r["fixed"])) == [1, 2, 3, 4]
    # the same function on the same batches as the plain loops bench: the same number
    assert r["fixed"][str(preset["mean_loops"])] == bench["loops"]["models"][0]["losses"][str(preset["mean_loops"])]
    by_eps = {a["threshold"]: a for a in r["adaptive"]}
    assert by_eps[0.0]["mean_loops"] == 4 and 1 <= by_eps[0.3]["mean_loops"] <= by_eps[0.05]["mean_loops"] <= 4
    # ε = 0 is the fixed cap computed through the cache: the two differ only in how attention sums
    # (a masked window of 32 keys vs the causal kernel), a few fp32 roundings per layer, ~1e-6 of a
    # loss of ~3 over a handful of layer applications; 1e-4 leaves a wide margin
    assert by_eps[0.0]["loss"] == pytest.approx(r["fixed"]["4"], abs=1e-4)
    for criterion in ("state", "kl"):      # a lower threshold never exits earlier
        points = sorted(r["simulated"][criterion], key=lambda p: -p["threshold"])
        assert all(1 <= p["mean_loops"] <= 4 for p in points)
        assert all(a["mean_loops"] <= b["mean_loops"] for a, b in zip(points, points[1:]))
    assert {(d["loops"], d["shared"]) for d in r["decoding"]} == {(2, False), (2, True), (4, False), (4, True)}
    assert all(math.isfinite(d["loss"]) for d in r["decoding"])
    assert "Claim: " in (bench["results"] / "adaptive.md").read_text()
    assert (bench["results"] / "adaptive.png").stat().st_size > 1000


def test_loops_speculative_measures_the_acceptance_of_each_draft_depth(bench):
    """On a CPU only the acceptance (the timing needs CUDA graphs): every draft depth below T and number of
    drafts per verify, sampled and greedy, each a rate in [0, 1] with at most drafts + 1 tokens per verify."""
    checkpoint = bench["loops"]["models"][0]["checkpoint"]
    result = loops.main(bench["args"] + ["--speculative", "--checkpoints", checkpoint, "--loops", "2",
                                         "--draft_loops", "1", "2", "--draft_tokens", "1", "3"])
    runs = result["models"][0]["runs"]
    assert [(d["sampling"], d["draft_loops"], d["draft_tokens"]) for d in runs] == [
        (s, K, n) for s in ("sampled", "greedy") for K, n in [(None, None), (1, 1), (1, 3)]]
    for d in runs[1:3] + runs[4:]:
        assert 0 <= d["acceptance"] <= 1 and 1 <= d["tokens_per_verify"] <= d["draft_tokens"] + 1
        assert d["tokens_per_sec"] is None
    text = (bench["results"] / "speculative.md").read_text()
    assert "| 1 | 3 |" in text and "Claim: not measured" in text


def test_the_decoding_speed_rows_and_their_claim(monkeypatch):
    """What bench/loops.py --adaptive times on a GPU, run on the CPU with few tokens (the rates are noise
    here): every row, with its mean loops per token and iterations per step, and the claim read from them."""
    from conftest import tiny, tokens
    monkeypatch.setattr(loops, "PROMPT", 8)
    monkeypatch.setattr(loops, "TIMED", (2, 4))
    rows = loops.decoding_speed(tiny(), tokens(B=8, L=8), 2, 4, 0.5)
    assert [(d["batch_size"], d["loops"], d["threshold"], d["kv_cache"], d["cuda_graph"]) for d in rows] == [
        (B, *row) for B in (1, 8) for row in [(2, None, "full", True), (4, None, "full", True), (4, 0.5, "full", True),
                                              (4, 0.5, "shared", True), (4, 0.5, "full", False)]]
    for d in rows:
        assert type(d["tokens_per_sec"]) is float and 1 <= d["mean_loops"] <= d["iterations"] <= d["loops"]
        if d["threshold"] is None:
            assert d["mean_loops"] == d["iterations"] == d["loops"]
    claim = loops.speed_claim({"speed": rows, "speed_threshold": 0.5, "mean_loops": 2})
    assert set(claim["ratio"]) == {"full", "shared"} and type(claim["holds"]) is bool


def test_a_decoding_rate_refuses_runs_that_end_in_different_spans_of_the_cache():
    """The rate is a difference of two runs, which must record the same graphs: with the cache's spans of
    256 positions, 128 + 136 and 128 + 256 both end in the second; 128 + 32 ends in the first, and its
    difference would time the second span's recording (the compile too, under --compile)."""
    from conftest import tiny, tokens
    model, prompt = tiny(), tokens(B=1, L=128)
    with pytest.raises(ValueError, match="different spans of the cache"):
        common.decoding_rate(model, prompt, (32, 256), loops=2)
    assert throughput.GENERATION_TIMED == (136, 256)
    rate, stats = common.decoding_rate(model, prompt[:, :8], (2, 4), loops=2)
    assert type(rate) is float and stats == {}


def test_the_adaptive_speed_claim_compares_exit_and_fixed_depth_at_batch_1_both_as_graphs_on_the_full_cache():
    """Rows launched from Python, at batch 8 or at other thresholds are faster here and must not count; the
    shared cache, 1.25× here, is reported, but its loss is another model's: the claim rests on the full one."""
    row = lambda **k: {"batch_size": 1, "loops": 16, "threshold": 0.1, "cuda_graph": True, "kv_cache": "full",
                       "tokens_per_sec": 100.0, "mean_loops": 5.0, "iterations": 5.0, **k}
    speed = [row(loops=8, threshold=None, tokens_per_sec=80.0), row(tokens_per_sec=90.0), row(kv_cache="shared"),
             row(cuda_graph=False, tokens_per_sec=500.0), row(batch_size=8, tokens_per_sec=500.0),
             row(threshold=0.3, tokens_per_sec=500.0)]
    claim = loops.speed_claim({"mean_loops": 8, "speed_threshold": 0.1, "speed": speed})
    assert claim["ratio"] == {"full": 90 / 80, "shared": 100 / 80} and not claim["holds"]
    speed[1]["tokens_per_sec"] = 100.0
    assert loops.speed_claim({"mean_loops": 8, "speed_threshold": 0.1, "speed": speed})["holds"]


def test_a_data_folder_without_its_token_files_is_one_line_saying_how_to_make_them(toy_data, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text(open(os.path.join(toy_data, "meta.json")).read())
    tiny = ["--preset", "tiny", "--results_dir", str(tmp_path)]
    for script, more in ((stability, tiny), (quality, tiny), (loops, tiny), (loops, tiny + ["--adaptive"]),
                         (loops, tiny + ["--speculative"]), (scaling, tiny),
                         (ddp, ["--device", "cpu", "--results_dir", str(tmp_path)])):
        with pytest.raises(SystemExit, match="train.bin not found: make the data first with `python prepare.py`"):
            script.main(["--data_dir", str(tmp_path / "data"), *more])


@pytest.mark.parametrize("arg, message", [(["--parallel", "0"], "argument --parallel: must be at least 1, got 0"),
                                          (["--gpus", "-1"], "argument --gpus: must be at least 0, got -1"),
                                          (["--tokens", "many"], "argument --tokens: 'many' is not a whole number")])
def test_a_count_below_its_least_value_is_an_argparse_error(toy_data, tmp_path, capsys, arg, message):
    with pytest.raises(SystemExit) as e:      # argparse's own: the usage, then one line of error
        stability.main(["--data_dir", toy_data, "--preset", "tiny", "--results_dir", str(tmp_path), *arg])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_a_dry_run_prints_the_commands_and_trains_nothing(toy_data, tmp_path, capsys):
    stability.main(["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(tmp_path / "work"),
                    "--results_dir", str(tmp_path / "results"), "--dry_run", "--set", "batch_size=8"])
    out = capsys.readouterr().out
    n = len(common.SWEEP_MODELS) * len(common.PRESETS["tiny"]["rates"])
    assert out.count("train.py --") == n and f"{n} runs" in out
    # --set applies before the token budget becomes steps: twice the batch, half the steps
    assert out.count("--batch_size=8 ") == n and out.count("--max_iters=10 ") == n
    assert not (tmp_path / "work").exists()


def test_a_torchrun_that_aborts_in_teardown_after_its_run_ended_is_a_warning_any_other_failure_stops(
        tmp_path, monkeypatch, capsys):
    """PyTorch's teardown under gloo rarely aborts a process ("terminate called without an active
    exception") after train.py has evaluated, saved and destroyed its process group: that run stands. The
    same abort before the last evaluation, or another failure, stops the bench with the processes' output."""
    args = argparse.Namespace(data_dir="d", steps=10, batch_size=2, micro_steps=2, device="cpu", gpus=[1, 2], set=[])
    out = tmp_path / "run"
    log_text = ["step 10 | val loss 8 loops 1.2\n", "terminate called without an active exception\n"]

    def fake_run(cmd, env, stdout, stderr):
        stdout.writelines(log_text)
        return subprocess.CompletedProcess(cmd, 1)
    monkeypatch.setattr(ddp.subprocess, "run", fake_run)
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss": {"8": 1.2}}) + "\n")
    (out / "ckpt.pt").write_bytes(b"")
    ddp.torchrun(2, "parcae_140m", str(out), args)
    assert "aborted in PyTorch's teardown" in capsys.readouterr().out
    (out / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": {"8": 1.2}}) + "\n")     # not ended
    with pytest.raises(SystemExit, match="failed \\(exit 1\\)"):
        ddp.torchrun(2, "parcae_140m", str(out), args)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss": {"8": 1.2}}) + "\n")
    log_text[1] = "RuntimeError: something else\n"
    with pytest.raises(SystemExit, match="something else"):
        ddp.torchrun(2, "parcae_140m", str(out), args)


def test_the_ddp_bench_runs_with_two_cpu_processes_and_their_losses_agree(tiny_data, tmp_path):
    """bench/ddp.py's logic on gloo: the same global batch on 1 and 2 processes gives the same
    losses to the last bit, and a 2-process checkpoint resumes on 1. Exact by construction: each
    micro-batch (its windows, depths and h_0) depends only on its index, and both runs give each
    process the same number of CPU threads (a matmul's rounding depends on it), so every micro-batch
    computes the same numbers; 1 process × 2 micro-steps halves each gradient going backward, DDP
    halves each rank's before the sum (×½ is exact), and a sum of two terms is the same in either
    order. The validation losses are summed in the same order on any number of ranks (train.evaluate)."""
    results = ddp.main(["--device", "cpu", "--gpus", "1", "2", "--models", "parcae_140m", "--steps", "10",
                        "--batch_size", "2", "--micro_steps", "2", "--resume_steps", "5",
                        "--data_dir", str(tiny_data), "--work_dir", str(tmp_path / "work"),
                        "--results_dir", str(tmp_path / "results")]
                       + [f"--set={kv}" for kv in ("n_embd=32", "n_head=2", "block_size=32", "n_prelude=1",
                                                    "n_core=1", "n_coda=1", "mean_loops=2", "backprop_loops=1",
                                                    "eval_iters=2", "compile=False")])
    one, two = results["runs"]["parcae_140m 1"], results["runs"]["parcae_140m 2"]
    assert sorted(one["losses"]) == sorted(two["losses"]) == [0, 5]
    assert two["max_loss_gap"] == 0 and two["val_loss"] == one["val_loss"] and 0 < two["scaling_efficiency"]
    # the checkpoint of step 10, written by 2 processes, trains on in one
    resumed = two["resumed_on_1_gpu"]
    assert sorted(resumed) == [10] and math.isfinite(resumed[10]) and resumed[10] < one["losses"][0]
    assert (tmp_path / "results" / "ddp.md").read_text().count("| parcae_140m |") == 2


def test_the_gpu_timeline_counts_kernels_once_and_nothing_else():
    """From a chrome trace: kernels, copies and memsets are summed, and their union is the busy
    time (an overlap counts once); CPU operators, GPU-side annotations such as Optimizer.step and
    the profiler's Command Buffer Full (the CPU waiting) are left out."""
    def event(cat, ts, dur, name="triton_per_fused_rms_norm_0"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}
    events = [event("kernel", 0, 100, "nvjet_sm90_tst_256x128"), event("kernel", 50, 100),     # overlap: busy 0..150
              event("gpu_memcpy", 200, 10, "Memcpy DtoD"), event("gpu_memset", 300, 5, "Memset"),
              event("cpu_op", 0, 1000, "aten::mm"), event("gpu_user_annotation", 0, 400, "Optimizer.step#Muon.step"),
              event("overhead", 400, 500, "Command Buffer Full"), {"ph": "i", "cat": "kernel", "ts": 0}]
    timeline = throughput.timeline_of(events)
    assert timeline["kernels"] == 4
    # whole µs, added exactly, then divided by 1e6 once: the floats 215e-6 and 165e-6
    assert timeline["kernel_s"] == 215e-6 and timeline["busy_s"] == 165e-6
    # per family, each event's seconds are added: a few rounded float64 terms, within 1e-15 relative
    assert timeline["by_family_s"] == pytest.approx({"matmul": 100e-6, "fused by torch.compile": 100e-6,
                                                     "other": 15e-6}, rel=1e-15)
    assert throughput.timeline_of([]) == {"kernels": 0, "kernel_s": 0.0, "busy_s": 0.0, "by_family_s": {}}
    assert throughput.kernel_family("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"


def test_runs_spread_over_the_gpus_longest_budget_first(tmp_path, monkeypatch):
    """run_all gives each run the least busy GPU (numbered among those CUDA_VISIBLE_DEVICES shows)
    and starts the largest budgets first; here each fake run records the GPU it was given."""
    script = "import os, sys; open(sys.argv[1], 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"
    monkeypatch.setattr(common, "train_command", lambda s: [sys.executable, "-c", script, s["out_dir"] + "/gpu.txt"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    runs = [(f"run{i}", dict(out_dir=str(tmp_path / f"run{i}"), max_iters=iters, batch_size=1,
                             grad_accum_steps=1, block_size=8)) for i, iters in enumerate([10, 30, 20])]
    common.run_all(runs, parallel=1, gpus=[0, 1])
    given = {name: (tmp_path / name / "gpu.txt").read_text() for name, _ in runs}
    assert given["run1"] == "5" and given["run2"] == "7"        # 30 and 20 steps start first, one per GPU
    assert given["run0"] in ("5", "7")


def test_the_masked_loops_flops_ratio_is_one_for_fixed_depths_and_grows_with_the_spread():
    """The most that skipping finished sequences can gain: nothing when every depth is the same, more
    when a micro-batch holds more sequences (its deepest one is deeper)."""
    from conftest import tiny
    assert throughput.masked_loop_flops_ratio(tiny(depth_sampling="fixed"), 8, draws=20) == 1.0
    model = tiny(mean_loops=8, backprop_loops=4)
    small, large = (throughput.masked_loop_flops_ratio(model, B, draws=200) for B in (2, 32))
    assert 1.0 < small < large
    # one sequence per micro-batch: nothing to skip (the same sum over and under the fraction)
    assert throughput.masked_loop_flops_ratio(model, 1, draws=20) == 1.0


@pytest.mark.parametrize("name", ["parcae_350m", "gpt_350m"])
def test_a_decoding_step_reads_each_layer_applications_weights_the_head_and_the_attended_cache(name):
    """decode_bytes against the 350m models' arithmetic, written out: d 1024, 4/4/4 layers (a core block's
    weights are read once per loop), 8 heads, GPT-2's vocabulary padded to 50,304. A block's matrices are
    12d² (q, k, v, c_proj: 4d²; fc, proj: 8d²), and every other layer has a value-embedding gate of 32 × 8,
    so every other layer application reads one; Parcae's injection reads B (d × d) at every iteration and
    C once. Each sequence reads the keys and values (2 × d) of each attended position in every application.
    All in bf16, 2 bytes each."""
    model, _ = throughput.build(name, 50257, device="meta")
    d, V, T, B, positions = 1024, 50304, 16, 8, 256
    looped = name == "parcae_350m"
    applications = 4 + (T if looped else 1) * 4 + 4         # 72 for Parcae, 12 for the Transformer
    weights = applications * 12 * d * d + applications // 2 * 32 * 8 + V * d + (T + 1) * d * d * looped
    keys_and_values = B * applications * 2 * positions * d
    assert throughput.decode_bytes(model, T, B, positions) == 2 * (weights + keys_and_values)
    # Parcae at batch 1: 1.95 GB of weights, 76 MB of cache, so at most about 2,370 tokens/s on an H200
    if looped:
        assert throughput.decode_bytes(model, T, 1, positions) == pytest.approx(2.025e9, rel=1e-3)
    assert throughput.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert throughput.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12 and throughput.peak_bandwidth("NVIDIA L4") == 0.3e12
    assert throughput.peak_bandwidth("NVIDIA A100-SXM4-40GB") is None     # not in the table: no bound


def test_the_before_after_table_gives_each_models_ratio_and_a_missing_copy_is_refused(tmp_path, monkeypatch):
    run = lambda tokens_per_sec, ms: {"tokens_per_sec": tokens_per_sec, "step_ms": ms, "peak_mem_gb": 51.4}
    results = {"environment": {"device": "NVIDIA H200", "gpus": 1, "torch": "2.11", "commit": "abc1234"},
               "command": "python bench/before_after.py --before .before --before_commit 78bbaf7",
               "before_commit": "78bbaf7", "steps": 8, "warmup": 4, "accum": 2,
               "training": {"parcae_350m": {"before": run(128_000, 512), "after": run(134_400, 488)},
                            "gpt_350m": {"before": run(297_640, 220)}}}      # (cut short: no after yet)
    text = before_after.markdown(results)
    assert "| parcae_350m | 128,000 | 134,400 | 1.050 | 512 → 488 | 51.4 → 51.4 |" in text
    assert "gpt_350m" not in text and "commit abc1234" in text
    monkeypatch.setattr(sys, "argv", ["before_after.py", "--before", str(tmp_path), "--before_commit", "x"])
    with pytest.raises(SystemExit, match="holds no bench/throughput.py: make it with git archive"):
        before_after.main()
    # each side is timed by its own files: a stand-in throughput.py in the copy is the one that runs
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "throughput.py").write_text(
        "def build(name, vocab_size):\n    return name, {'batch_size': 3}\n"
        "def time_training(model, batch_size, accum, steps, warmup):\n"
        "    return {'model': model, 'args': [batch_size, accum, steps, warmup], 'file': __file__}\n")
    r = before_after.time_in(str(tmp_path), "gpt_350m", steps=8, warmup=4, accum=2)
    assert r == {"model": "gpt_350m", "args": [3, 2, 8, 4], "file": str(tmp_path / "bench" / "throughput.py")}


def test_the_large_configs_table_gives_a_runs_time_at_8_gpus_and_says_what_did_not_fit():
    """bench/throughput.py --large_only's markdown, on made-up numbers (the measurement needs a GPU)."""
    row = {"batch_size": 8, "accum": 4, "run_tokens": 8 * 86_400 * 10_000}
    results = {"gpu": "H200", "torch": "2.11", "cuda": "12.8", "commit": "x", "steps": 4, "warmup": 3,
               "training": {}, "generation": [],
               "large": {"parcae_1.3b": {**row, "activation_checkpoint": True, "params": 1.69e9,
                                         "tokens_per_sec": 10_000, "step_ms": 6554, "mfu": 0.3, "peak_mem_gb": 60.0,
                                         "peak_reserved_gb": 64.0},
                         "parcae_1.3b activation_checkpoint=False": {**row, "activation_checkpoint": False,
                                                                     "out_of_memory": True, "peak_reserved_gb": 140.0}}}
    table = throughput.markdown(results)
    assert "| parcae_1.3b | 1690.0M | 8×2048 × 4 | yes | 10,000 | 6554 | 30.0 % | 60.0 | 64.0 | 1.0 days |" in table
    assert "| parcae_1.3b activation_checkpoint=False | | 8×2048 × 4 | no | out of memory | | | | 140.0 | |" in table


def test_a_steps_useful_flops_count_each_sequence_at_its_own_depth():
    """Exact: the same products and sums as model.flops_per_token's own, in the same order."""
    from conftest import tiny
    model, L = tiny(mean_loops=4, backprop_loops=2), 64
    f = model.flops_per_token
    assert throughput.step_flops(model, [3] * 5, L) == L * sum([f(loops=3)] * 5)
    assert throughput.step_flops(model, [7, 5, 2, 1], L) == L * (f(loops=7) + f(loops=5) + f(loops=2) + f(loops=1))
    gpt = tiny(injection="none")
    assert throughput.step_flops(gpt, [1] * 4, L) == 4 * L * gpt.flops_per_token()


def test_steady_state_leaves_out_the_steps_that_compiled_and_warmup_ends_after_the_last_of_them():
    # 8 steps: compiling at 0, 1 and 4 (4 is in the second half, the window); made-up seconds and FLOPs,
    # sums of small integers and halves: exact in float64
    steps = {"times": [10.0, 2.0, 1.0, 1.0, 3.0, 0.5, 1.0, 0.5], "compiles": [5, 1, 0, 0, 2, 0, 0, 0],
             "flops": [8.0, 8.0, 8.0, 8.0, 8.0, 4.0, 8.0, 4.0]}
    r = throughput.steady_state(steps, tokens_per_step=100, peak=32.0)
    assert r["steady_steps"] == 3 and r["tokens_per_sec"] == 300 / 2.0 and r["step_ms"] == 1000 * 2.0 / 3
    assert r["useful_flops_per_sec"] == 16.0 / 2.0 and r["mfu"] == 0.25
    assert r["warmup_s"] == 17.0 and r["compile_steps"] == 3 and r["late_compile_steps"] == 1
    assert r["compile_steps_s"] == 15.0
    assert throughput.steady_state({**steps, "compiles": [0] * 8}, 100)["warmup_s"] == 0.0


def test_the_small_throughput_mode_writes_a_run_per_model_and_layout(tmp_path):
    """On the CPU, not compiled, tiny shapes: the layout of throughput_small.json (no timing asserted)."""
    write = lambda results: common.write_results(str(tmp_path), "throughput_small", results, throughput.small_markdown)
    results = throughput.time_small(4, torch.device("cpu"), (1, 1, 1), 4, compiled=False, save=write,
                                    block_size=32, n_embd=32, n_head=2, vocab_size=97)
    with open(tmp_path / "throughput_small.json") as f:
        assert json.load(f) == json.loads(json.dumps(results))
    runs = results["runs"]
    assert [(r["layers"], r["model"], r["per_sequence_depths"]) for r in runs] == [
        (layers, model, depths) for layers in ([1, 2, 1], [1, 1, 1])
        for model, depths in (("gpt", None), ("parcae", True), ("parcae", False))]
    for r in runs:
        assert r["d_model"] == 32 and r["tokens_per_sec"] > 0 and r["mfu"] is None and r["warmup_s"] == 0.0
        assert r["steady_steps"] == 2 and r["compile_steps"] == 0       # the second half, nothing compiled
    table = (tmp_path / "throughput_small.md").read_text()
    assert table.count("| 1/2/1 | 32 |") == 3 and "per sequence" in table and "per step" in table


def test_the_small_throughput_mode_profiles_each_model_when_asked(tmp_path):
    """--small --profile on the CPU: a table per model, and its figures in its run (a CPU runs no kernels:
    the GPU was busy 0 % of a step) and in the markdown."""
    results = throughput.time_small(2, torch.device("cpu"), (1, 1, 1), 2, compiled=False,
                                    profiles=str(tmp_path / "profiles"), block_size=16, n_embd=32, n_head=2,
                                    vocab_size=97)
    names = sorted(p.name for p in (tmp_path / "profiles").iterdir())
    assert names == sorted(f"small_{layers}_d32_{model}.txt" for layers in ("121", "111")
                           for model in ("gpt", "parcae_per_sequence", "parcae_per_step"))
    for r in results["runs"]:
        assert r["gpu_busy_frac"] == 0.0 and r["gpu_ms"] == 0.0 and r["gpu_ms_by_family"] == {}
    text = (tmp_path / "profiles" / "small_111_d32_parcae_per_sequence.txt").read_text()
    assert text.startswith("step ") and "(0 % busy)" in text and "aten::scaled_dot_product_attention" in text
    table = throughput.small_markdown(results)
    assert "`python bench/throughput.py --small --profile`" in table
    assert "- 1/1/1 parcae, per sequence: GPU busy 0 % (0.0 ms a step; no GPU kernels)" in table


def test_the_decoding_profile_writes_a_table_of_one_prefill_and_the_new_tokens(tmp_path):
    from conftest import tiny
    path = tmp_path / "profiles" / "generate.txt"
    model = tiny(block_size=160)
    throughput.profile_decoding(model, 2, str(path), new_tokens=3)
    text = path.read_text()
    assert text.startswith("loops 2, batch 1: the prefill of 128 tokens and 3 decoding steps")
    assert "aten::scaled_dot_product_attention" in text


@pytest.mark.parametrize("name", ["throughput", "throughput_140m", "throughput_parcae_alone", "throughput_gen",
                                  "throughput_layouts", "throughput_cache", "stability", "quality", "loops",
                                  "adaptive", "scaling", "ddp", "ddp_2xh200/ddp", "ddp_4xh200/ddp",
                                  "throughput_before_after", "throughput_small", "throughput_770m", "throughput_1.3b",
                                  "throughput_parcae_1.3b", "speculative", "scaling_code64/scaling",
                                  "throughput_decode_ops"])
def test_each_committed_table_is_what_its_script_makes_of_its_json(name):
    """bench/results/*.md are not edited by hand: each is its script's markdown() of the JSON beside it."""
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")
    markdown = {"stability": stability.markdown, "quality": quality.markdown, "loops": loops.markdown,
                "adaptive": loops.adaptive_markdown, "speculative": loops.speculative_markdown,
                "scaling": scaling.markdown,
                "ddp": ddp.markdown, "throughput_before_after": before_after.markdown,
                "throughput_small": throughput.small_markdown,
                "throughput_decode_ops": throughput.decode_ops_markdown}.get(os.path.basename(name), throughput.markdown)
    if name == "scaling" and not os.path.exists(os.path.join(results, "scaling.json")):
        pytest.skip("no committed scaling.json yet: the sweep's first GPU job writes it (bench/scaling.py --dry_run)")
    with open(os.path.join(results, name + ".json")) as f, open(os.path.join(results, name + ".md")) as g:
        assert markdown(json.load(f)) == g.read()


def test_the_decode_ops_mode_times_each_variant_and_checks_it_computes_the_same():
    """On the CPU, small shapes, nothing compiled: every matmul and attention variant is timed and agrees
    with its group's first row. Outputs are of unit scale (weights scaled by 1/√in) and bf16 keeps 8
    significant bits, so roundings differ by a few 2^-8 ≈ 0.004 over sums of at most 256 products; a
    variant that computed something else (a transposed weight, a mask ignored) would differ by O(1)."""
    torch.manual_seed(0)
    rows = throughput.time_decode_ops(d=64, n_head=4, spans=(16,), calls=2, device=torch.device("cpu"), compiled=False)
    matmuls, attention = [r for r in rows if r["op"] == "matmul"], [r for r in rows if r["op"] == "attention"]
    assert len(matmuls) == 4 * 3 and len(attention) == 3      # cuBLAS and 2 reductions; default, math, softmax
    assert {r["shape"] for r in matmuls} == {"64x64", "192x64", "256x64", "64x256"}
    assert all(r["us"] > 0 and r["bandwidth_share"] is None for r in rows)
    assert all((r["max_abs_diff"] is None) == (i % 3 == 0) for i, r in enumerate(matmuls))
    assert all(r["max_abs_diff"] < 0.1 for r in rows if r["max_abs_diff"] is not None)
    assert matmuls[0]["bytes"] == 2 * 64 * 64 and attention[0]["bytes"] == 2 * 2 * 4 * 16 * 16
    text = throughput.decode_ops_markdown({"gpu": "cpu", "torch": torch.__version__, "commit": "x", "calls": 2,
                                               "decode_ops": rows})
    assert text.count("\n| matmul |") == 12 and text.count("\n| attention |") == 3
