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
import subprocess
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


def test_the_parabola_fits_the_window_around_the_lowest_loss():
    # the shape of the sweep's 1.4e16 curve: μ_rec 1 below 2, then a minimum near 5. The 4 μ_rec nearest
    # the lowest point lie on a parabola in ln μ_rec with its vertex at 5, so the window recovers it up to
    # rounding; one parabola through all 6 opens downward and has no vertex at all
    parabola = lambda mu: 0.631 + 0.01 * math.log(mu / 5) ** 2
    points = [(mu, parabola(mu)) for mu in (3, 4, 6, 8)] + [(1, 0.636), (2, 0.645)]
    assert np.polyfit(np.log([m for m, _ in points]), [loss for _, loss in points], 2)[0] < 0
    f = scaling.fit_budget(1e16, points, FLOPS_AT)
    assert sorted(f["mu"]) == [3, 4, 6, 8] and f["swept"] == [1, 2, 3, 4, 6, 8]
    assert f["mu_star"] == pytest.approx(5, rel=1e-9) and f["L_star"] == pytest.approx(0.631, abs=1e-12)


def test_a_second_seed_gets_its_own_offset_not_a_tilt_of_the_curve():
    # a seed fixes the training batches of all its runs, so the sweep's second seed sat lower at every
    # pair. Here seed 1338 is the same parabola 0.007 nats lower at 3 of its μ_rec: with the offset the fit
    # is exact again (rounding in lstsq, about 1e-16 times the condition number of a 7-column design,
    # stays far below the tolerances); pooled as one curve, the lower points pull μ* towards them
    parabola = lambda mu: 0.631 + 0.01 * math.log(mu / 5) ** 2
    first = [(mu, parabola(mu), scaling.SEED) for mu in (3, 4, 6, 8)]
    first += [(1, 0.636, scaling.SEED), (2, 0.645, scaling.SEED)]
    second = [(mu, parabola(mu) - 0.007, scaling.SEED + 1) for mu in (3, 4, 6)]
    f = scaling.fit_budget(1e16, first + second, FLOPS_AT)
    assert sorted(set(f["mu"])) == [3, 4, 6, 8] and f["seed"].count(scaling.SEED + 1) == 3
    assert f["mu_star"] == pytest.approx(5, rel=1e-9) and f["L_star"] == pytest.approx(0.631, abs=1e-10)
    assert f["seed_offsets"][scaling.SEED + 1] == pytest.approx(-0.007, abs=1e-10)
    pooled = scaling.fit_budget(1e16, [p[:2] for p in first + second], FLOPS_AT)     # μ* 4.58 here
    assert pooled["seed_offsets"] == {} and pooled["mu_star"] < 4.7
    # a second seed only at μ_rec outside the window takes no part in the fit, and gets no offset
    alone = scaling.fit_budget(1e16, first + [(1, 0.62, scaling.SEED + 1)], FLOPS_AT)
    assert alone["seed_offsets"] == {} and alone["mu_star"] == pytest.approx(5, rel=1e-9)


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


def test_the_bootstrap_interval_of_each_budgets_optimum_covers_the_true_one():
    """40 noisy isoFLOP curves of the sweep's μ_rec (6 points, 0.003 nats of noise against a parabola of depth
    0.02 per (ln μ)², true μ* 2.5): the 95 % interval of μ* (200 resamples each) must hold 2.5 in at least 34
    of them. A correct interval covers 38 on average; the case bootstrap of so few points covers a little less
    (we measured 95 of 100 at these settings); 34 or more has probability > 0.97 at 93 % coverage."""
    rng, covered = np.random.default_rng(1), 0
    for k in range(40):
        pts = [(mu, 0.02 * math.log(mu / 2.5) ** 2 + 0.003 * rng.normal()) for mu in (1, 2, 3, 4, 6, 8)]
        lo, hi = scaling.bootstrap({1e15: pts}, None, 200, seed=k)["mu_star"][1e15]
        covered += lo <= 2.5 <= hi
    assert covered >= 34


def test_a_budget_of_three_depths_gets_no_interval():
    """Every resample of 3 distinct μ_rec is those 3 again, which a parabola fits exactly: the interval would
    have no width however noisy the runs, so there is none; the optimum is still fitted."""
    pts = [(1, 0.958), (4, 1.093), (8, 1.412)]      # the first 3 looped runs of the byte sweep at 4.4e14
    assert scaling.bootstrap({4.4e14: pts}, None, 50)["mu_star"][4.4e14] is None
    assert scaling.bootstrap({4.4e14: pts + [(2, 0.95)]}, None, 50)["mu_star"][4.4e14] is not None


E_LAW = {"E": 1.2, "A": 400.0, "alpha": 0.35, "B": 900.0, "beta": 0.3}


def law_runs():
    """Parcae runs of the sweep's shape on an exact parametric law: N(μ) = 1.0M + 0.4M·μ unrolled parameters,
    D = C / F(μ) tokens with F(μ) = 6·N(μ)."""
    runs = []
    for C in BUDGETS:
        for mu in MUS:
            N = 1.4e6 + (mu - 1) * 4e5
            D = C / (6 * N)
            runs.append({"budget": C, "mu": mu, "non_embedding_params": 1.4e6, "looped_params": 4e5, "tokens": D,
                         "val_loss": float(scaling.predict(E_LAW, N, D))})
    return runs


def test_the_parametric_law_is_recovered_from_exact_losses_and_predicts_a_left_out_budget():
    runs = law_runs()
    fit = scaling.fit_parametric([scaling.unrolled_params(r) for r in runs], [r["tokens"] for r in runs],
                                 [r["val_loss"] for r in runs])
    # Levenberg–Marquardt from the grid's best point converges on exact data until the squared error is
    # rounding (losses ~2, 28 points: residuals ~1e-15); the parameters then sit within ~1e-9 of the truth
    for k, v in E_LAW.items():
        assert fit[k] == pytest.approx(v, rel=1e-6), k
    assert fit["r2"] == pytest.approx(1, abs=1e-12)
    flops_at = scaling.interpolate_flops({mu: 6 * (1e6 + 4e5 * mu) for mu in MUS})
    law = scaling.parametric_law(runs, flops_at, BUDGETS)
    assert law["left_out"]["budget"] == max(BUDGETS) and law["left_out"]["max_abs"] < 1e-6
    # its optimum at each C: the same grid of μ_rec over the true law, with the same F(μ) (interpolate_flops)
    mus = np.geomspace(1, 16, 200)
    for C in BUDGETS:
        true = scaling.predict(E_LAW, 1e6 + 4e5 * mus, [C / flops_at(mu) for mu in mus])
        assert law["mu_star"][f"{C:.6g}"] == mus[int(np.argmin(true))]


def test_seed_noise_is_the_rms_difference_over_root_two():
    runs = [{"budget": 1.0, "mu": 2, "seed": scaling.SEED, "val_loss": 1.0},
            {"budget": 1.0, "mu": 2, "seed": scaling.SEED + 1, "val_loss": 1.5},
            {"budget": 1.0, "mu": 4, "seed": scaling.SEED, "val_loss": 2.0},
            {"budget": 1.0, "mu": 4, "seed": scaling.SEED + 1, "val_loss": 1.75},
            {"budget": 1.0, "mu": 6, "seed": scaling.SEED, "val_loss": 3.0}]
    noise = scaling.seed_noise(runs)
    assert [p["difference"] for p in noise["pairs"]] == [0.5, -0.25]     # exact binary fractions
    assert noise["sigma"] == math.sqrt((0.25 + 0.0625) / 4)
    # mean 0.125; both differences 0.375 from it, and √(2·0.375² / 2) = 0.375: all exact in binary
    assert noise["mean"] == 0.125 and noise["sigma_about_mean"] == 0.375

# -----------------------------------------------------------------------------
# the plan: which runs, how long, in which GPU jobs


def fake_run(name, flops, tokens):
    return {"name": name, "flops": flops, "eval_flops": 0.0, "tokens": tokens}


def test_the_jobs_hold_every_run_once_and_last_at_most_job_seconds():
    from types import SimpleNamespace
    args = SimpleNamespace(parallel=2, startup=1.0, rate=2.0,
                           scaling={"job_seconds": 14, "prepare_s": 2, "report_s": 0.5})
    # each run: 1 s of start-up + flops · 2 / 2 s
    runs = [fake_run(f"r{i}", flops, 100 - i) for i, flops in enumerate([9, 5, 4, 4, 3, 2, 2, 1, 1, 1, 20])]
    packed = scaling.jobs(runs, args)
    assert sorted(r["name"] for job in packed for r in job) == sorted(r["name"] for r in runs)
    # 21 s: longer than a job, it gets its own, whose other slot takes the next longest (10 s, ending sooner)
    assert [r["name"] for r in packed[0]] == ["r10", "r0"]
    assert all(scaling.job_time(job, args) <= 14 for job in packed[1:])
    # two slots, the most tokens first: 10 s and 6 s, then 2 s on the freer slot
    three = [fake_run("a", 9, 3), fake_run("b", 5, 2), fake_run("c", 1, 1)]
    assert scaling.makespan(three, args) == 10.0
    # the job: the corpus, its runs, a report after each and one at the end (binary fractions: exact)
    assert scaling.job_time(three, args) == 2 + 10 + 0.5 * 4 and scaling.job_time(three, args, slower=3) == 34


@pytest.fixture
def plan_args(toy_data, tmp_path):
    """The tiny sweep's arguments, with no run trained: tests fill args.ledger with made-up results."""
    return scaling.parse(["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(tmp_path / "work"),
                          "--results_dir", str(tmp_path / "results")])


def record(args, losses, seed=scaling.SEED, C=1e9):
    """Made-up finished runs of budget C: {μ_rec: validation loss} into args.ledger."""
    for mu, loss in losses.items():
        run = scaling.make_run(args, C, mu, seed)
        args.ledger[scaling.key(run)] = {"val_loss": loss, "wall_s": 1.0}


def test_a_budget_whose_deepest_run_is_best_gets_a_deeper_one_then_second_seeds_near_its_optimum(plan_args):
    base = len(scaling.plan(plan_args))
    assert base == 3 * 4
    record(plan_args, {1: 2.0, 2: 1.9, 4: 1.8})         # the deepest is best: μ_rec 6 comes next, no seeds yet
    assert [r["name"] for r in scaling.plan(plan_args)[base:]] == ["parcae_mu6_C1e+09"]
    record(plan_args, {6: 1.85})        # now 4 is best: the 3 μ_rec nearest the parabola's vertex get seed 2
    extra = scaling.plan(plan_args)[base:]
    vertex = scaling.fit_budget(1e9, [(1, 2.0), (2, 1.9), (4, 1.8), (6, 1.85)])["mu_star"]
    assert 4 < vertex < 6
    assert [r["name"] for r in extra] == ["parcae_mu6_C1e+09"] + [f"parcae_mu{mu}_C1e+09_seed2" for mu in (2, 4, 6)]
    assert all(r["seed"] == scaling.SEED + 1 and r["settings"]["seed"] == scaling.SEED + 1 for r in extra[1:])


def test_the_deepest_extension_ends_the_extending_and_small_budgets_get_no_second_seed(plan_args):
    base = len(scaling.plan(plan_args))
    record(plan_args, {1: 2.0, 2: 1.9, 4: 1.8, 6: 1.7})         # the deepest best, and no deeper to add
    record(plan_args, {1: 2.0, 2: 1.9, 4: 2.1}, C=2.5e8)        # the smallest budget: never a second seed
    assert [r["name"] for r in scaling.plan(plan_args)[base:]] == [
        "parcae_mu6_C1e+09"] + [f"parcae_mu{mu}_C1e+09_seed2" for mu in (2, 4, 6)]


def test_the_time_model_is_measured_from_the_runs_wall_times(plan_args):
    runs = scaling.plan(plan_args)
    assert scaling.time_model(runs, plan_args) == (3, 1e9, False)      # the preset's, until runs say otherwise
    # 4 runs of about the same FLOPs (as one budget's are in the small preset): no slope to trust
    alike = [{**r, "flops": 1e9 + i * 1e8, "eval_flops": 0.0} for i, r in enumerate(runs[:4])]
    for r in alike:
        plan_args.ledger[scaling.key(r)] = {"wall_s": 2 + r["flops"] * 4 / 5e9}
    assert scaling.time_model(alike, plan_args) == (3, 1e9, False)
    for r in runs[:5]:        # wall time = 2 s + FLOPs at a parallel-th of 5e9 FLOP/s
        plan_args.ledger[scaling.key(r)] = {"wall_s": 2 + (r["flops"] + r["eval_flops"]) * 4 / 5e9}
    startup, rate, measured = scaling.time_model(runs, plan_args)
    # a least-squares line through 5 exact points, FLOPs of ~1e9: rounding leaves ~1e-12 of either
    assert startup == pytest.approx(2, rel=1e-9) and rate == pytest.approx(5e9, rel=1e-9) and measured


def test_a_record_of_another_corpus_in_the_same_folder_is_refused(plan_args):
    other = {"data": {**plan_args.corpus, "train_sha256": "0" * 64}, "runs": []}
    with pytest.raises(SystemExit, match="scaling.json's runs trained on another .* prepare the same corpus"):
        scaling.ledger([other], plan_args.corpus)
    assert scaling.ledger([{"data": {"data_dir": "data/sitepkg"}, "runs": [{"status": "finished"}]}],
                          plan_args.corpus) == ({}, [])     # another sweep's record: a new sweep replaces it


def test_the_gpu_sweep_meets_its_plan(tmp_path):
    """The small preset on a byte-level corpus (made-up tokens: only the vocabulary counts here): ≥ 4 budgets over
    ≥ 30×, μ_rec 1, 2, 3, 4, 6, 8 and the Transformer with the same layers at each, ≥ 300 tokens per
    non-embedding parameter for the largest budget's μ_rec 1, at most 1.5 epochs of the docstring's 650M
    training tokens, every run shorter than a GPU job at the preset's time model, and the schedules in
    proportion to each run."""
    data = tmp_path / "code"
    data.mkdir()
    for split in ("train", "val"):
        (np.arange(4096) % 257).astype(np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"tokenizer": "byte", "vocab_size": 257, "eot_token": 256}))
    args = scaling.parse(["--data_dir", str(data), "--work_dir", str(tmp_path / "work"),
                          "--results_dir", str(tmp_path / "results")])
    args.startup, args.rate, _ = scaling.time_model([], args)
    runs, budgets = scaling.plan(args), scaling.SCALING["small"]["budgets"]
    assert len(budgets) >= 4 and max(budgets) / min(budgets) >= 30
    for C in budgets:
        here = [r for r in runs if r["budget"] == C]
        assert sorted(r["mu"] or 0 for r in here) == [0, 1, 2, 3, 4, 6, 8]
        assert all(r["mu_bwd"] == math.ceil(r["mu"] / 2) for r in here if r["mu"])
    gpt, parcae = (common.meta_model(next(r for r in runs if r["model"] == m)["settings"], 257) for m in ("gpt", "parcae"))
    assert (len(gpt.blocks()), gpt.config.looped) == (len(parcae.blocks()), False)
    top = next(r for r in runs if r["budget"] == max(budgets) and r["mu"] == 1)
    assert top["tokens_per_param"] >= 300
    for r in runs:
        s = r["settings"]
        # at most 1.5 epochs of data/src, whose 591,866,250 training tokens the first GPU job recorded
        assert r["tokens"] <= 1.5 * 591_866_250 and scaling.job_time([r], args) <= args.scaling["job_seconds"] <= 540
        assert s["momentum_warmup_iters"] == max(1, round(scaling.MOMENTUM_WARMUP_SHARE * s["max_iters"]))
        assert s["eval_interval"] == s["max_iters"] and s["seed"] == scaling.SEED and s["compile"] is True
        assert s["batch_size"] * s["block_size"] == 128 * 512 and s["n_embd"] == 256
    assert scaling.MOMENTUM_WARMUP_SHARE == 300 / 21_400

# -----------------------------------------------------------------------------
# the sweep, end to end on the CPU


@pytest.fixture(scope="module")
def sweep(toy_data, tmp_path_factory):
    """One call of the tiny sweep: its 12 first runs, then the second seeds (and any deeper μ_rec) they make due."""
    root = tmp_path_factory.mktemp("scaling")
    args = ["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(root / "work"),
            "--results_dir", str(root / "results"), "--bootstrap", "50"]
    return {"args": args, "results_dir": root / "results", "work": root / "work", "results": scaling.main(args)}


def test_every_run_trains_its_budget_and_is_evaluated_at_every_depth(sweep, toy_data):
    results, preset = sweep["results"], scaling.SCALING["tiny"]
    runs = results["runs"]
    first = [r for r in runs if r["seed"] == scaling.SEED]
    assert {(r["budget"], r["mu"] or 0) for r in first} >= {(C, mu) for C in preset["budgets"]
                                                            for mu in [0, *preset["mean_loops"]]}
    per_step = 4 * 32       # the tiny preset's batch × block
    for r in runs:
        s = r["settings"]
        assert r["status"] == "finished" and os.path.exists(os.path.join(r["out_dir"], "ckpt.pt"))
        assert r["tokens"] == r["steps"] * per_step and r["epochs"] == r["tokens"] / 70_000
        # C / F tokens, rounded to whole steps: off by at most half a step's FLOPs
        assert abs(r["flops"] - r["budget"]) <= r["flops_per_token"] * per_step / 2
        assert s["seed"] == r["seed"] and s["eval_interval"] == s["max_iters"]
        assert s["momentum_warmup_iters"] == max(1, round(scaling.MOMENTUM_WARMUP_SHARE * s["max_iters"]))
        model = common.meta_model(s, 64)
        assert r["non_embedding_params"] == scaling.param_counts(model)[0] < r["params"] == model.num_params()
        if r["mu"] is None:     # the Transformer: one evaluation, its nominal cost
            assert list(r["losses"]) == ["1"] and r["test_time_fit"] is None
            assert r["flops_per_token"] == model.flops_per_token()
        else:
            assert sorted(map(int, r["losses"])) == scaling.LOOPS and r["mu_bwd"] == math.ceil(r["mu"] / 2)
            assert all(math.isfinite(L) for L in r["losses"].values())
            assert r["val_loss"] == r["losses"][str(r["mu"])]
            assert r["test_time_fit"]["r2"] <= 1
    with open(os.path.join(toy_data, "train.bin"), "rb") as f:
        assert results["data"]["train_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert (results["data"]["train_tokens"], results["data"]["val_tokens"]) == (70_000, 10_000)
    assert sum(len(c["runs"]) for c in results["calls"]) == len(runs)
    assert results["flops_per_sec"] == sum(c["flops"] for c in results["calls"]) / sum(c["seconds"] for c in results["calls"])


def test_the_second_seeds_retrain_the_three_runs_nearest_the_optimum_of_the_two_largest_budgets(sweep):
    results = sweep["results"]
    for C in scaling.SCALING["tiny"]["budgets"]:
        first = {r["mu"]: r["val_loss"] for r in results["runs"] if r["budget"] == C and r["mu"] and r["seed"] == scaling.SEED}
        second = sorted(r["mu"] for r in results["runs"] if r["budget"] == C and r["seed"] == scaling.SEED + 1)
        if C in scaling.SCALING["tiny"]["budgets"][-2:]:
            best = scaling.fit_budget(C, list(first.items()))["mu_best"]
            assert second == sorted(sorted(first, key=lambda mu: (abs(math.log(mu / best)), mu))[:3])
        else:
            assert second == []
    noise = results["seed_noise"]
    assert len(noise["pairs"]) == 6 and noise["sigma"] > 0


def test_each_budget_has_its_parabola_interval_and_the_laws_theirs(sweep):
    results = sweep["results"]
    for b in results["isoflop"]:
        f, interval = b["fit"], b["mu_star_ci95"]
        assert np.polyval(f["coef"], np.log(f["mu"])) == pytest.approx(f["loss"], abs=0.5)    # a fit, of noisy runs
        # an interval only with 4 distinct μ_rec or more: every resample of 3 fits them exactly
        assert (interval is not None) == (len(set(f["mu"])) >= 4)
        if interval:    # a resample's window may lie elsewhere in the swept range
            assert min(f["swept"]) <= interval[0] <= interval[1] <= max(f["swept"])
        if f["mu_star"] is not None:
            assert 1 <= f["mu_star"] <= max(f["mu"]) and f["D_star"] == pytest.approx(b["budget"] / scaling.interpolate_flops(
                {r["mu"]: r["flops_per_token"] for r in results["runs"] if r["mu"]})(f["mu_star"]))
        assert math.isfinite(b["gpt_loss"]) and min(f["swept"]) <= b["mu_star_law"] <= max(f["swept"])
    laws, ci = results["laws"], results["bootstrap"]
    for k, law, field in (("a", "mu_star", "exponent"), ("b", "D_star", "exponent"), ("alpha", "L_star", "alpha")):
        if laws[law] and ci[k]["ci95"]:
            assert ci[k]["ci95"][0] <= ci[k]["ci95"][1]
    law = results["parametric"]
    assert law["n"] == sum(1 for r in results["runs"] if r["mu"]) and math.isfinite(law["left_out"]["rmse"])


def test_the_report_files_say_what_was_run_and_what_held(sweep):
    table = (sweep["results_dir"] / "scaling.md").read_text()
    assert "python bench/scaling.py --data_dir" in table and "**Verdict.**" in table
    assert "Looping and data in tandem" in table and "checkpoints reach R² ≥ 0.98" in table
    assert "Does looping pay" in table and "parametric law" in table and "Seed noise:" in table
    for C in scaling.SCALING["tiny"]["budgets"]:
        seeds = 3 if C in scaling.SCALING["tiny"]["budgets"][-2:] else 0
        looped = sum(1 for r in sweep["results"]["runs"] if r["budget"] == C and r["mu"])
        assert table.count(f"| {C:.3g} |") == 1 + looped and looped >= 3 + seeds     # the isoFLOP and test-time rows
    for name in ("scaling_isoflop.png", "scaling_laws.png", "scaling_testtime.png"):
        assert (sweep["results_dir"] / name).stat().st_size > 1000
    with open(sweep["results_dir"] / "scaling.json") as f:
        assert json.load(f)["verdict"] == sweep["results"]["verdict"]


def test_a_second_call_trains_nothing_and_reports_the_same(sweep, capsys):
    capsys.readouterr()
    again = scaling.main(sweep["args"])
    out = capsys.readouterr().out
    assert "left: 0 runs" in out and "[1/" not in out and "FLOPs with evaluation" not in out
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in sweep["results"]["runs"]]
    assert again["laws"] == sweep["results"]["laws"] and again["calls"] == sweep["results"]["calls"]
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
        assert "[1/" not in out and "left: 0 runs" in out and not sweep["work"].exists()
        assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in sweep["results"]["runs"]]
        assert again["isoflop"] == sweep["results"]["isoflop"] and again["laws"] == sweep["results"]["laws"]
    finally:
        aside.rename(sweep["work"])


def test_a_dry_run_lists_the_gpu_jobs_left_and_trains_nothing(toy_data, tmp_path, capsys):
    args = ["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(tmp_path / "work"),
            "--results_dir", str(tmp_path / "results"), "--dry_run"]
    scaling.main(args)
    out = capsys.readouterr().out
    commands = [line.strip() for line in out.splitlines() if "--only " in line]
    jobs = [command.split("--only ")[1].split() for command in commands]
    assert sorted(name for job in jobs for name in job) == sorted(
        f"{m}_C{C:.3g}" for C in scaling.SCALING["tiny"]["budgets"]
        for m in ["gpt", "parcae_mu1", "parcae_mu2", "parcae_mu4"])
    assert "then: second seeds at C = 5e+08, 1e+09" in out and out.count("to train") == 12
    assert not (tmp_path / "work").exists()
    # a job's command runs as printed, in the repository, its report going to $OUT (here a dry run of it)
    run = subprocess.run(["bash", "-c", commands[0].replace("python ", f"{sys.executable} ", 1) + " --dry_run"],
                         cwd=ROOT, env=dict(os.environ, OUT=str(tmp_path / "out")), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out").is_dir() and f"--data_dir {toy_data}" in commands[0]


def records_of(runs, loss=2.0, data=None):
    """A scaling.json as a GPU job leaves it: these runs finished, one call that trained them."""
    data = data or {"data_dir": "data/src", "tokenizer": "byte", "vocab_size": 257, "source": "made up",
                    "train_tokens": 650_000_000, "train_sha256": "ab" * 32, "val_tokens": 1, "val_sha256": "cd" * 32}
    call = {"runs": [r["name"] for r in runs], "flops": 1.0, "seconds": 1.0, "device": "NVIDIA H200", "torch": "2.11"}
    return {"data": data, "calls": [call],
            "runs": [{**r, "status": "finished", "val_loss": loss, "wall_s": 60.0} for r in runs]}


def test_a_plan_on_a_machine_without_the_corpus_continues_from_every_committed_record(tmp_path, monkeypatch, capsys):
    """The small sweep planned where data/src is not (the lead's machine): its runs come from the records in
    bench/results, scaling.json and a second job's scaling_<job>.json merged; the jobs left exclude them."""
    committed = tmp_path / "committed"
    committed.mkdir()
    monkeypatch.setattr(scaling, "RESULTS", str(committed))
    monkeypatch.chdir(tmp_path)         # no data/src here
    dry = ["--dry_run", "--results_dir", str(committed)]     # (the default would read the real bench/results)
    args = scaling.parse(dry)
    assert args.meta == {"vocab_size": 257, "train_tokens": None} and args.ledger == {}
    runs = scaling.plan(args)
    first, second = ([r for r in runs if r["budget"] == C] for C in scaling.SCALING["small"]["budgets"][:2])
    (committed / "scaling.json").write_text(json.dumps(records_of(first)))
    (committed / "scaling_job2.json").write_text(json.dumps(records_of(first[:1] + second)))    # one run in both
    scaling.main(dry)
    out = capsys.readouterr().out
    done = {line.split()[0] for line in out.splitlines() if line.endswith("  done")}
    assert done == {r["name"] for r in first + second} and out.count("to train") == len(runs) - len(done)
    commands = [line.strip() for line in out.splitlines() if "--only " in line]
    left = sorted(name for command in commands for name in command.split("--only ")[1].split())
    assert left == sorted(r["name"] for r in runs if r["name"] not in done)
    for command in commands:      # the corpus unless the machine still has it, then the job, its report into $OUT
        assert command.startswith("{ [ -f data/src/meta.json ] || python prepare.py --input \"$(python -c")
        assert "--tokenizer byte --name src; } && python bench/scaling.py --results_dir \"$OUT\" --only" in command
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0 and len(command) < 2000
    args = scaling.parse(dry)
    assert len(args.calls) == 2 and args.meta["train_tokens"] == 650_000_000      # calls merged, not repeated
    with pytest.raises(SystemExit, match="data/src/meta.json not found: prepare the sweep's corpus first, python prepare"):
        scaling.parse(["--only", "gpt_*", "--results_dir", str(committed)])
    other = records_of(second, data={**records_of([])["data"], "train_sha256": "ef" * 32})
    (committed / "scaling_job3.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="trained on another data/src"):
        scaling.parse(dry)


def test_only_trains_the_runs_named_and_the_report_covers_the_sweep(toy_data, tmp_path, capsys, monkeypatch):
    args = ["--data_dir", toy_data, "--preset", "tiny", "--work_dir", str(tmp_path / "work"),
            "--results_dir", str(tmp_path / "results"), "--bootstrap", "10", "--only", "gpt_C2.5e+08", "nothing_*"]
    reports, report = [], scaling.report
    monkeypatch.setattr(scaling, "report", lambda *a: reports.append(a[2]) or report(*a))
    results = scaling.main(args)
    out = capsys.readouterr().out
    assert "--only nothing_*: no run of the sweep has this name (yet)" in out and "[1/1] gpt_C2.5e+08" in out
    # a report as soon as the run ended (a job stopped later keeps it), and one at the end, with the whole call
    assert len(reports) == 2 and [c["runs"] for c in reports[0]] == [["gpt_C2.5e+08"]]
    assert [c["runs"] for c in reports[1]] == [["gpt_C2.5e+08"]] and reports[1][0]["seconds"] >= reports[0][0]["seconds"]
    status = {r["name"]: r["status"] for r in results["runs"]}
    assert status.pop("gpt_C2.5e+08") == "finished" and set(status.values()) == {"not run"}
    assert "left: 11 runs" in out


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
