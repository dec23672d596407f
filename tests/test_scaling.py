"""
bench/scaling.py: the isoFLOP sweep end to end on the CPU (tiny preset, real train.py runs), its
arithmetic (the expected FLOPs per token over the sampled depths, the fits and their bootstrap
intervals, checked on synthetic curves with known exponents), and prepare.py's handling of a large
source tree (duplicate files, a suffix filter, the vectorised char tokenizer).
"""

import hashlib
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import prepare  # noqa: E402
import scaling  # noqa: E402
from conftest import tiny  # noqa: E402

# -----------------------------------------------------------------------------
# FLOPs per token over the sampled depths


def test_expected_flops_at_backprop_1_is_the_nominal_cost_at_the_mean_depth_1_plus_e_to_the_minus_mu():
    """With μ_bwd = 1 every sequence backpropagates through one iteration, so the cost is linear in T
    and its expectation is the cost at E[T] = E[max(1, Poisson(μ))] = μ + e^−μ (exact up to rounding)."""
    for mu in (1, 3):
        model = tiny(mean_loops=mu, backprop_loops=1)
        f = model.flops_per_token
        expected = f(loops=1) + (mu + math.exp(-mu) - 1) * (f(loops=2) - f(loops=1))
        assert scaling.expected_flops_per_token(model) == pytest.approx(expected, rel=1e-12)
        assert expected > f()       # more than at the nominal depth μ_rec


def test_expected_flops_match_the_average_over_the_models_own_depth_draws():
    """Monte Carlo over 100k depths from GPT.sample_depths (μ_rec 4, μ_bwd 2): the mean cost lies within
    5 standard errors of the exact expectation."""
    model = tiny(mean_loops=4, backprop_loops=2)
    torch.manual_seed(0)
    depths = model.sample_depths(100_000)
    cost = {T: model.flops_per_token(loops=T) for T in depths.unique().tolist()}
    draws = np.array([cost[T] for T in depths.tolist()])
    assert abs(draws.mean() - scaling.expected_flops_per_token(model)) < 5 * draws.std() / math.sqrt(draws.size)


def test_the_transformer_costs_its_nominal_flops():
    model = tiny(injection="none")
    assert scaling.expected_flops_per_token(model) == model.flops_per_token()

# -----------------------------------------------------------------------------
# the fits, on synthetic isoFLOP curves with known laws
#
# They run in float64 on exact data: least squares over 4-7 points, well conditioned (ln μ in [0, 2.8]),
# a few dozen operations of 2^-53 ≈ 1e-16 each, so rounding moves a result by ~1e-13 at most. The
# tolerances 1e-9 and 1e-12 sit far above that and far below any wrong exponent; loops.fit_exponential's
# scan is coarser, and its tolerances say why.

BUDGETS = [1e14, 3.16e14, 1e15, 3.16e15]
MUS = [1, 2, 4, 6, 8, 12, 16]
A_TRUE, ALPHA_TRUE, E_TRUE = 0.4, 0.3, 1.5


def synthetic_points(noise=0.0, seed=0):
    """Loss = L*(C) + 0.05·(ln μ − ln μ*(C))², with μ*(C) = 2·(C / 1e14)^0.4 (inside 1 … 16) and
    L*(C) = 1.5 + 2·(C / 1e14)^−0.3; FLOPs per token ∝ μ, so D* = C / F(μ*) ∝ C^(1 − 0.4) exactly."""
    rng = np.random.default_rng(seed)
    points = {}
    for C in BUDGETS:
        mu_star, L_star = 2 * (C / 1e14) ** A_TRUE, E_TRUE + 2 * (C / 1e14) ** -ALPHA_TRUE
        points[C] = [(mu, L_star + 0.05 * math.log(mu / mu_star) ** 2 + noise * rng.normal()) for mu in MUS]
    return points


FLOPS_AT = scaling.interpolate_flops({mu: 1e8 * mu for mu in MUS})   # log-log interpolation of a power law: exact


def test_the_fits_recover_the_exponents_of_noise_free_curves():
    fits = [scaling.fit_budget(C, pts, FLOPS_AT) for C, pts in synthetic_points().items()]
    for f, C in zip(fits, BUDGETS):
        # the loss is exactly quadratic in ln μ, so the parabola's vertex is μ* up to rounding
        assert f["mu_star"] == pytest.approx(2 * (C / 1e14) ** A_TRUE, rel=1e-9)
        assert f["L_star"] == pytest.approx(E_TRUE + 2 * (C / 1e14) ** -ALPHA_TRUE, rel=1e-9)
    laws = scaling.fit_laws(fits)
    assert laws["mu_star"]["exponent"] == pytest.approx(A_TRUE, abs=1e-9)
    assert laws["D_star"]["exponent"] == pytest.approx(1 - A_TRUE, abs=1e-9)
    assert laws["mu_star"]["r2"] == pytest.approx(1, abs=1e-12)
    # α comes from loops.fit_exponential's scan, whose last grid steps by ~1.7e-7·α (a log grid of 400 points
    # over [1e-3, 5], then three zooms of 101 points over two cells): 1e-5 leaves room for rounding
    L = laws["L_star"]
    assert L["alpha"] == pytest.approx(ALPHA_TRUE, rel=1e-5)
    assert L["E"] == pytest.approx(E_TRUE, abs=1e-5)
    assert L["A"] == pytest.approx(2 * 1e14 ** ALPHA_TRUE, rel=1e-4)     # A·C^(-α): ln(1e14) ≈ 32 times α's error


def test_the_bootstrap_intervals_contain_the_true_exponents_of_noisy_curves():
    """0.01 nats of noise on every run (seed 0); 300 resamples."""
    points = synthetic_points(noise=0.01)
    fits = [scaling.fit_budget(C, pts, FLOPS_AT) for C, pts in points.items()]
    estimate = scaling.fit_laws(fits)
    ci = scaling.bootstrap(points, FLOPS_AT, 300)
    for key, law, field, true in (("a", "mu_star", "exponent", A_TRUE), ("b", "D_star", "exponent", 1 - A_TRUE),
                                  ("alpha", "L_star", "alpha", ALPHA_TRUE)):
        lo, hi = ci[key]["ci95"]
        assert lo < true < hi and lo < estimate[law][field] < hi
    assert ci["a"]["ci95"][0] > 0       # informative: μ* grows with C at this noise
    assert scaling.bootstrap(points, FLOPS_AT, 20) == scaling.bootstrap(points, FLOPS_AT, 20)    # a fixed seed


def test_a_minimum_outside_the_swept_range_gives_no_mu_star():
    """A loss that falls all the way to the deepest μ has no vertex inside: the budget says where its lowest
    loss is and stays out of the μ* law."""
    f = scaling.fit_budget(1e15, [(mu, 3 - 0.1 * math.log(mu) + 0.001 * math.log(mu) ** 2) for mu in MUS], FLOPS_AT)
    # exp(ln 16), and the parabola through exactly quadratic points at its end: within rounding (1e-13)
    assert f["mu_star"] is None and f["D_star"] is None and f["edge"] == "largest" and f["mu_best"] == pytest.approx(16)
    assert f["L_star"] == pytest.approx(3 - 0.1 * math.log(16) + 0.001 * math.log(16) ** 2)


def test_the_test_time_law_is_found_when_it_holds():
    """Checkpoints whose L(T) decay at z = 1.2·μ_rec^−0.5 and saturate at L∞ = 1.5 + 2·(C/1e14)^−0.3."""
    runs = []
    for C in BUDGETS:
        for mu in MUS:
            fit = {"L_inf": 1.5 + 2 * (C / 1e14) ** -0.3, "Z": 0.5, "z": 1.2 * mu ** -0.5, "r2": 0.999}
            runs.append({"mu": mu, "budget": C, "test_time_fit": fit})
    law = scaling.test_time_law(runs)
    assert law["holds"] and law["passing"] == law["checkpoints"] == len(runs) and law["left_out"] == 0
    assert law["z_law"]["exponent"] == pytest.approx(-0.5, abs=1e-9)
    assert law["L_inf_law"]["alpha"] == pytest.approx(0.3, rel=1e-5)
    # z depends on μ_rec alone, L∞ on C alone
    assert law["z_explained_by"]["mu_rec"] == pytest.approx(1) and law["z_explained_by"]["budget"] < 0.01
    assert law["L_inf_explained_by"]["budget"] == pytest.approx(1) and law["L_inf_explained_by"]["mu_rec"] < 0.01


def test_the_parts_share_the_runs_and_the_flops():
    runs = [{"name": str(i), "flops": w, "eval_flops": 1.0} for i, w in enumerate([8, 8, 4, 4, 2, 2, 1, 1, 1])]
    parts = scaling.split(runs, 2)
    assert sorted(r["name"] for part in parts for r in part) == sorted(r["name"] for r in runs)
    load = [sum(r["flops"] + r["eval_flops"] for r in part) for part in parts]
    assert abs(load[0] - load[1]) <= 9     # at most one run's work apart
    with pytest.raises(SystemExit, match="expected K/N"):
        scaling.parse_part("3/2")

# -----------------------------------------------------------------------------
# the sweep, end to end on the CPU


@pytest.fixture(scope="module")
def sweep(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    args = ["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(root / "work"),
            "--results_dir", str(root / "results"), "--parallel", "4", "--bootstrap", "50"]
    return {"args": args, "results_dir": root / "results", "work": root / "work", "results": scaling.main(args)}


def test_every_run_trains_its_budget_and_is_evaluated_at_every_depth(sweep, toy_data):
    results, preset = sweep["results"], scaling.SCALING["tiny"]
    runs = results["runs"]
    assert sorted((r["budget"], r["mu"] or 0) for r in runs) == sorted(
        (C, mu) for C in preset["budgets"] for mu in [0, *preset["mean_loops"]])
    per_step = 4 * 32       # the tiny preset's batch × block
    for r in runs:
        assert r["status"] == "finished" and os.path.exists(os.path.join(r["out_dir"], "ckpt.pt"))
        assert r["tokens"] == r["steps"] * per_step
        # C / F tokens, rounded to whole steps: off by at most half a step's FLOPs
        assert abs(r["flops"] - r["budget"]) <= r["flops_per_token"] * per_step / 2
        if r["mu"] is None:     # the Transformer: one evaluation, its nominal cost
            assert list(r["losses"]) == ["1"] and r["test_time_fit"] is None
            assert r["flops_per_token"] == common.meta_model(r["settings"], 64).flops_per_token()
        else:
            assert sorted(map(int, r["losses"])) == scaling.LOOPS and r["mu_bwd"] == math.ceil(r["mu"] / 2)
            assert all(math.isfinite(L) for L in r["losses"].values())
            assert r["val_loss"] == r["losses"][str(r["mu"])]
            assert r["test_time_fit"]["r2"] <= 1
    with open(os.path.join(toy_data, "train.bin"), "rb") as f:
        assert results["data"]["train_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert (results["data"]["train_tokens"], results["data"]["val_tokens"]) == (70_000, 10_000)


def test_each_budget_has_its_parabola_and_the_laws_their_intervals(sweep):
    results = sweep["results"]
    for b in results["isoflop"]:
        f = b["fit"]
        # three μ_rec: the parabola passes through every point, so its lowest value is at most the lowest loss
        assert np.polyval(f["coef"], np.log(f["mu"])) == pytest.approx(f["loss"], abs=1e-9)
        assert f["L_star"] <= min(f["loss"]) + 1e-9
        if f["mu_star"] is not None:
            assert 1 <= f["mu_star"] <= 4 and f["D_star"] == pytest.approx(b["budget"] / scaling.interpolate_flops(
                {r["mu"]: r["flops_per_token"] for r in results["runs"] if r["mu"]})(f["mu_star"]))
        else:
            assert f["L_star"] == pytest.approx(min(f["loss"]))
        assert math.isfinite(b["gpt_loss"])
    laws, ci = results["laws"], results["bootstrap"]
    for key, law, field in (("a", "mu_star", "exponent"), ("b", "D_star", "exponent"), ("alpha", "L_star", "alpha")):
        if laws[law]:       # three μ_rec per budget: every resample is the same three runs
            lo, hi = ci[key]["ci95"]
            assert lo - 1e-9 <= laws[law][field] <= hi + 1e-9


def test_the_report_files_say_what_was_run_and_what_held(sweep):
    table = (sweep["results_dir"] / "scaling.md").read_text()
    assert "python bench/scaling.py --data_dir" in table and "**Verdict.**" in table
    assert "Looping and data in tandem" in table and "checkpoints reach R² ≥ 0.98" in table
    for C in scaling.SCALING["tiny"]["budgets"]:
        assert table.count(f"| {C:.3g} |") == 1 + 3     # the isoFLOP row and the test-time rows
    for name in ("scaling_isoflop.png", "scaling_laws.png", "scaling_testtime.png"):
        assert (sweep["results_dir"] / name).stat().st_size > 1000
    with open(sweep["results_dir"] / "scaling.json") as f:
        assert json.load(f)["verdict"] == sweep["results"]["verdict"]


def test_a_second_call_trains_nothing_and_reports_the_same(sweep, capsys):
    capsys.readouterr()
    again = scaling.main(sweep["args"])
    out = capsys.readouterr().out
    assert "to train: 0 runs" in out and "[1/" not in out
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in sweep["results"]["runs"]]
    assert again["laws"] == sweep["results"]["laws"]
    report = scaling.main(sweep["args"] + ["--report_only"])
    assert report["isoflop"] == sweep["results"]["isoflop"]


def test_a_fresh_machine_continues_the_sweep_from_its_scaling_json(sweep, capsys):
    """With the run folders gone (a new GPU machine), the results file still says which runs finished:
    none trains again, and the report is the same."""
    aside = sweep["work"].with_name("work-aside")
    sweep["work"].rename(aside)
    try:
        capsys.readouterr()
        again = scaling.main(sweep["args"])
        out = capsys.readouterr().out
        assert "[1/" not in out and "to train: 0 runs" in out and not sweep["work"].exists()
        assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in sweep["results"]["runs"]]
        assert again["isoflop"] == sweep["results"]["isoflop"] and again["laws"] == sweep["results"]["laws"]
    finally:
        aside.rename(sweep["work"])


def test_a_dry_run_prints_the_plan_of_its_part_and_trains_nothing(toy_data, tmp_path, capsys):
    args = ["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(tmp_path / "work"),
            "--results_dir", str(tmp_path / "results"), "--dry_run"]
    listed = []
    for part in ("1/2", "2/2"):
        scaling.main(args + ["--part", part])
        out = capsys.readouterr().out
        listed += [line.split()[0] for line in out.splitlines() if line.strip().endswith("to train")]
        assert "FLOP/s over all runs" in out and f"part {part}" in out
    assert sorted(listed) == sorted(f"{m}_C{C:.3g}" for C in scaling.SCALING["tiny"]["budgets"]
                                    for m in ["gpt", "parcae_mu1", "parcae_mu2", "parcae_mu4"])
    assert not (tmp_path / "work").exists()

# -----------------------------------------------------------------------------
# prepare.py on a source tree


def test_prepare_drops_duplicate_files_and_reads_only_the_suffixes_asked(tmp_path, capsys):
    root = tmp_path / "site-packages"
    (root / "pkg" / "_vendor" / "six").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("import six\n")
    (root / "pkg" / "b.py").write_text("print('b')\n")
    (root / "pkg" / "_vendor" / "six" / "six.py").write_text("print('b')\n")   # the same content as b.py
    (root / "pkg" / "stub.pyi").write_text("def f() -> int: ...\n")
    (root / "pkg" / "README.txt").write_text("not Python\n")
    (root / "pkg" / "mod.cpython-311.so").write_bytes(b"\x7fELF\0\0")
    (root / "pkg" / "gone.py").symlink_to(root / "pkg" / "deleted.py")      # a broken link is skipped
    folder = prepare.prepare(inputs=[str(root)], tokenizer="char", out_dir=tmp_path / "data", suffixes=[".py"])
    out = capsys.readouterr().out
    assert "dropped 1 file(s) whose content an earlier file has" in out and "skipped 1 unreadable" in out
    meta = json.loads((tmp_path / "data" / "text-char" / "meta.json").read_text())
    _, decode = prepare.load_tokenizer(meta)
    ids = np.concatenate([np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=np.uint16) for s in ("val", "train")])
    # a folder's files come before its subfolders': b.py is kept, its vendored copy dropped
    assert decode(ids.tolist()) == f"import six\n{prepare.EOT_TEXT}print('b')\n{prepare.EOT_TEXT}"
    assert "1 duplicate(s) dropped" in meta["source"]
    # --suffix takes a list, and can be repeated
    prepare.main(["--input", str(root), "--suffix", ".py", "--suffix", ".pyi", "--tokenizer", "char",
                  "--out_dir", str(tmp_path / "data2")])
    meta = json.loads((tmp_path / "data2" / "text-char" / "meta.json").read_text())
    assert meta["train_docs"] + meta["val_docs"] == 3
    with pytest.raises(SystemExit, match="--suffix filters the files of --input folders"):
        prepare.prepare(source="stdlib", suffixes=[".py"], out_dir=tmp_path / "data3")


def test_the_fast_char_tokenizer_gives_the_ids_of_the_character_loop():
    """Documents with ASCII, accents, CJK, an emoji (beyond the 16-bit plane) and an empty one, in batches of
    two documents, so the batches' boundaries are crossed."""
    docs = ["def f(x):\n    return x\n", "café ☕ naïve", "", "数据 🐍 data", "tab\tand\r\nnewlines", "z"]
    chars = prepare.char_vocabulary(docs)
    assert chars == "".join(sorted(set("".join(docs))))
    eot, encode = len(chars), prepare.char_encoder(chars)
    slow = [i for d in docs for i in encode(d) + [eot]]
    fast = np.concatenate(list(prepare.char_token_chunks(docs, chars, eot, batch=2)))
    assert fast.dtype == np.uint16 and fast.tolist() == slow
