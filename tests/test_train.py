"""train.py: the configurator, the schedules, and short real training runs on a tiny model."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import ROOT, reordering_bound
from model import GPT


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r and not r.get("skipped")}


def with_training_forward(patch):
    """A GPT whose training forwards go through patch(step, loss) -> loss (one micro-step per step)."""
    class Patched(GPT):
        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if self.training:
                self.steps_seen = getattr(self, "steps_seen", -1) + 1
                loss = patch(self.steps_seen, loss)
            return logits, loss
    return Patched


# -----------------------------------------------------------------------------
# the configurator


def test_unknown_setting_is_refused_naming_the_nearest_valid_one():
    with pytest.raises(SystemExit, match="unknown setting 'max_iter' .*'max_iters'"):
        train.parse_settings(["--max_iter=5"])


@pytest.mark.parametrize("arg, message", [
    ("--max_iters=1.5", "max_iters must be an integer"),
    ("--prelude_norm=1", "prelude_norm must be True or False"),
    ("--eval_loops=4", "eval_loops must be a list"),
    ("--compile=yes", "compile must be one of 'auto', True, False"),
    ("--schedule=linear", "schedule must be one of"),
    ("--batch_size=0", "batch_size must be a whole number of at least 1"),
    ("--eval_loops=[4, 0]", "eval_loops must be whole numbers of at least 1"),
    ("--eval_loops=[]", "eval_loops must be whole numbers of at least 1"),
    ("--init_from=resum", "--init_from=resum: init_from must be scratch, resume, a folder .* or a Hugging Face name "
                          "such as SandyResearch/parcae-140m, not 'resum' \\(did you mean 'resume'\\?\\)"),
    ("--init_from=parcae-140m", "did you mean 'SandyResearch/parcae-140m'"),
])
def test_a_value_of_the_wrong_type_or_range_is_refused(arg, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_settings([arg])


def test_values_are_python_literals_or_else_strings():
    s = train.parse_settings(["--lr=3", "--device=cpu", "--eval_loops=[1, 3]", "--compile=False"])
    assert s["lr"] == 3.0 and type(s["lr"]) is float      # an int is fine where a float is expected
    assert s["device"] == "cpu" and s["eval_loops"] == [1, 3] and s["compile"] is False


def test_config_file_is_applied_then_overridden_and_its_typos_refused(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("# a config\nbatch_size = 4\nn_embd = 64\n")
    s = train.parse_settings([str(good), "--n_embd=96"])
    assert s["batch_size"] == 4 and s["n_embd"] == 96
    typo = tmp_path / "typo.py"
    typo.write_text("bach_size = 4\n")
    with pytest.raises(SystemExit, match="typo.py: unknown setting 'bach_size' .*'batch_size'"):
        train.parse_settings([str(typo)])


# the paper's models (MODEL.md section 6): parameters with its 32,768-token vocabulary, the micro-batch the
# authors launch each with, and the training tokens (~80 per parameter)
PAPER = {"parcae_140m": (144.3e6, 16, 11.2e9), "gpt_140m": (143.1e6, 16, 11.2e9),
         "parcae_350m": (388.0e6, 16, 31.5e9), "gpt_350m": (385.9e6, 16, 31.5e9),
         "parcae_770m": (776.7e6, 8, 61.6e9), "gpt_770m": (773.4e6, 32, 61.6e9),
         "parcae_1.3b": (1338.6e6, 8, 104e9), "gpt_1.3b": (1333.9e6, 16, 104e9)}


@pytest.mark.parametrize("name", PAPER)
def test_each_config_is_the_papers_model_and_recipe(name):
    params, micro_batch, tokens = PAPER[name]
    s = train.parse_settings([os.path.join(ROOT, "config", f"{name}.py")])
    with torch.device("meta"):          # shapes only: no memory, no init time
        model = GPT(train.model_config(s, 32768))
    assert model.num_params() == pytest.approx(params, abs=0.05e6)      # the table's rounding
    tokens_per_step = s["batch_size"] * s["grad_accum_steps"] * s["block_size"]
    assert (s["block_size"], s["batch_size"], tokens_per_step) == (2048, micro_batch, 256 * 2048)
    assert s["grad_accum_steps"] % 8 == 0                               # 8 GPUs share the micro-steps
    large = name.endswith(("770m", "1.3b"))
    assert (s["lr"], s["adamw_lr"] or s["lr"]) == (8e-3, 6e-3 if large else 8e-3)     # Muon's, AdamW's
    assert float(f"{s['max_iters'] * tokens_per_step:.3g}") == tokens  # to the 3 digits the paper gives
    assert s["activation_checkpoint"] == (name == "parcae_1.3b")        # as the release has it
    if model.config.looped:
        assert (model.config.mean_loops, model.config.backprop_loops, model.config.depth_sampling) == \
            (8, 4, "per-sequence")


def test_adamw_follows_the_schedule_to_its_own_peak(tiny_args, tmp_path, monkeypatch):
    seen = []
    step = train.Muon.step
    monkeypatch.setattr(train.Muon, "step", lambda self: (seen.append(self.param_groups[0]["lr"]), step(self)))
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]),
                                                                         adamw_step(self, *a, **k))[1])
    train.main(tiny_args(max_iters=4, lr=0.5, adamw_lr=0.25, cooldown_frac=0.5, eval_interval=4))
    assert seen == [0.5, 0.25, 0.5, 0.25, 0.5, 0.25, 0.25, 0.125]


def test_trapezoid_is_constant_then_falls_linearly_to_zero_and_cosine_ends_at_min_lr():
    cfg = SimpleNamespace(lr=1.0, max_iters=100, warmup_iters=0, schedule="trapezoid", cooldown_frac=0.5, min_lr=0.1)
    assert [train.lr_at(s, cfg) for s in (0, 49, 50, 75, 99)] == [1.0, 1.0, 1.0, 0.5, 0.02]
    cfg.warmup_iters = 10
    assert train.lr_at(0, cfg) == 0.1 and train.lr_at(9, cfg) == 1.0     # 1/10, rounded once: the float 0.1
    cfg.schedule = "cosine"
    assert train.lr_at(10, cfg) == 1.0 and train.lr_at(100, cfg) == 0.1   # cos(π) rounds to -1 exactly


def test_muons_momentum_warms_up_over_momentum_warmup_iters_then_stays(tiny_args, tmp_path, monkeypatch):
    """0.85 at step 0, + 0.10 · step / momentum_warmup_iters, 0.95 from then on (the sweep sets a run's
    warm-up in proportion to its length)."""
    seen = []
    step = train.Muon.step

    def record(self):
        seen.append(self.param_groups[0]["momentum"])
        step(self)
    monkeypatch.setattr(train.Muon, "step", record)
    train.main(tiny_args(max_iters=8, eval_interval=8, momentum_warmup_iters=4))
    # the same arithmetic as train.py's, so equal to the last bit; and 0.85 + 0.10 rounds to the float 0.95
    assert seen == [0.85 + 0.10 * min(1.0, k / 4) for k in range(8)] and seen[4:] == [0.95] * 4


def test_validation_windows_do_not_depend_on_the_seed_and_training_windows_do(tiny_data):
    data = train.load_tokens(str(tiny_data / "train.bin"), 32, 10_000)
    batch = lambda seed, split: train.get_batch(data, split, 3, 0, SimpleNamespace(seed=seed, batch_size=4,
                                                                                   block_size=32), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(batch(1, 1), batch(2, 1)))
    assert not torch.equal(batch(1, 0)[0], batch(2, 0)[0])


# -----------------------------------------------------------------------------
# training runs


def test_mfu_needs_a_known_gpu_and_peak_rates_match_whole_names(monkeypatch):
    model = GPT(train.model_config({**train.SETTINGS, "n_embd": 32, "n_head": 2}, 97))
    assert train.estimate_mfu(model, 1e6, "cpu") is None            # no GPU: no peak to compare with
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA L4", 121e12),
                       ("NVIDIA L40S", 362e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert train.peak_flops("cuda") == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert train.estimate_mfu(model, 1e6, "cuda") == model.flops_per_token() * 1e6 / 989e12


def test_the_compiled_model_computes_the_same_loss_and_gradients():
    """train.py compiles every block and the head (its fused fp32 cross-entropy) for GPU runs."""
    from conftest import tiny, tokens
    x = tokens(B=4)
    losses, grads = [], []
    for compiled in (False, True):
        model = tiny().train()
        if compiled:
            train.compile_model(model)
        torch.manual_seed(0)            # the same depths and h_0
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch._dynamo.reset()
    # The compiled kernels fuse operations and add the same ≤ 128 terms (channels, logits) in other
    # orders. The depths drawn are 7, 5, 4, 3: the forward is 16 block applications and the head, the
    # backward ~10 more (2 loops of 2 core blocks, the coda, the head, the prelude).
    torch.testing.assert_close(losses[1], losses[0], rtol=reordering_bound(n=128, layers=17), atol=0)
    for name, g in grads[0].items():
        bound = reordering_bound(n=128, layers=27) * g.abs().max().item()
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=bound, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bf16", [False, True])
def test_iterations_replayed_as_cuda_graphs_follow_the_weights_as_they_change(bf16):
    """The no-grad iterations replay recorded graphs, one per number of running sequences rounded up to a
    multiple of 8; after the weights change in place (as an optimizer step changes them), a replay computes
    with the new weights, also under bf16 autocast."""
    from conftest import tiny, tokens
    model = tiny().cuda()
    graphed = train.GraphedIterations(model.core_iteration)
    x = tokens(B=12, L=16)[:, :-1].cuda()
    e = torch.randn(12, 16, 32, device="cuda")
    h = torch.randn(12, 16, 32, device="cuda")
    cos, sin = model.cos[:16], model.sin[:16]
    for change in range(3):
        # one autocast block per step, as in training: inside one, eager code reuses autocast's bf16 copies
        # of the weights, made before they changed
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            for m in (8, 3, 12, 8):    # 8 rows, 8 with 5 padded, 16 with 4 padded: two graphs in one pool
                want = model.core_iteration(h[:m], e[:m], x[:m], cos, sin)
                got = graphed(h[:m], e[:m], x[:m], cos, sin)
                # The same kernels on the same inputs, except that cuBLAS may pick another algorithm
                # inside a capture: sums of up to 4·32 terms in another order, through 2 blocks (4 sums);
                # in bf16 an output rounds to 8 bits, so a reordering can flip its last bit: 2^-8 of it.
                U_out = 2.0 ** -8 if bf16 else reordering_bound(n=128, layers=4)
                torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * U_out * want.abs().max().item())
            for p in model.core.parameters():
                p.mul_(1.5)            # in place, as Muon and AdamW update them
    assert len(graphed.graphs) == 2


def test_activation_checkpointing_gives_the_same_loss_and_gradients_bit_for_bit():
    """
    train.checkpoint_blocks (activation_checkpoint = True) keeps only each block's inputs and reruns the block
    in the backward. Exact by construction: the backward is the same graph, and each rerun computes the
    activations it dropped from the same inputs by the same operations, on one thread, so to the same bits.
    The depths drawn (above and below backprop_loops) put no-grad iterations and truncated backprop in it.
    """
    from conftest import tiny, tokens
    x = tokens(B=8, L=24)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for checkpointing in (False, True):
            model = tiny(mean_loops=4, backprop_loops=2).train()
            if checkpointing:
                train.checkpoint_blocks(model)
            calls = []
            for block in model.blocks():     # (the attention inside each block: the rerun calls it too)
                block.attn.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
            torch.manual_seed(5)            # the same depths and h_0
            depths = model.sample_depths(8)
            torch.manual_seed(5)
            _, loss = model(x[:, :-1], x[:, 1:])
            forward_calls = len(calls)
            loss.backward()
            runs.append((loss, {n: p.grad for n, p in model.named_parameters()}, forward_calls, calls))
    finally:
        torch.set_num_threads(threads)
    assert depths.max() > 2 >= depths.min()     # some sequences loop without gradient, some only with it
    (loss, grads, n, calls), (loss_c, grads_c, n_c, calls_c) = runs
    assert torch.equal(loss_c, loss) and all(torch.equal(grads_c[k], g) for k, g in grads.items())
    # the same forward, then the blocks run with gradient run again in the backward
    assert n_c == n and calls_c[:n] == calls and len(calls_c) == n + sum(calls)


@pytest.mark.parametrize("injection", ["parcae", "none"])
def test_a_30_step_run_learns_the_pattern(tiny_args, tmp_path, injection):
    final = train.main(tiny_args(injection=injection))
    losses = train_losses(tmp_path / "out")
    assert sorted(losses) == list(range(30))
    assert losses[29] < 0.5 * losses[0]     # it falls to about 2 % of it: far beyond what rounding could move
    evals = [r for r in metrics(tmp_path / "out") if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]       # not at step 0: the first training loss tells that
    assert list(final) == (["1", "2"] if injection == "parcae" else ["1"])     # the Transformer runs once
    assert all(final[k] < 0.5 * losses[0] for k in final)
    last = metrics(tmp_path / "out")[-2]
    assert set(last) == {"step", "loss", "lr", "tokens_per_sec", "mfu", "grad_norm", "state_norm",
                         "residual", "a_max", "a_mean", "time", "peak_mem_gb"}
    assert last["peak_mem_gb"] is None      # GPU memory only
    assert (last["a_max"] is None) == (injection == "none")
    assert 0 < last["a_max"] < 1 if injection == "parcae" else True
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["meta"]["tokenizer"] == "char"
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])


def test_resuming_after_a_crash_continues_exactly_from_the_last_checkpoint(tiny_args, tmp_path, monkeypatch):
    train.main(tiny_args(max_iters=20, out_dir=str(tmp_path / "whole")))

    def crash(step, loss):
        if step == 12:
            raise KeyboardInterrupt
        return loss
    with monkeypatch.context() as m:
        m.setattr(train, "GPT", with_training_forward(crash))
        with pytest.raises(KeyboardInterrupt):
            train.main(tiny_args(max_iters=20, out_dir=str(tmp_path / "split")))
    assert max(train_losses(tmp_path / "split")) == 11     # it logged two steps past the checkpoint
    train.main(tiny_args(max_iters=20, out_dir=str(tmp_path / "split"), init_from="resume"))
    # the same losses to the last bit, and the log reads as one run
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_sec", "time", "mfu")} for r in rs]
    assert strip(split) == strip(whole)


def test_resume_refuses_other_model_settings_and_a_damaged_checkpoint(tiny_args, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train.main(tiny_args(init_from="resume"))
    train.main(tiny_args(max_iters=10))
    # a new run in the same out_dir would overwrite that checkpoint: refused, and the checkpoint kept
    saved = (tmp_path / "out" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run .*--init_from=resume"):
        train.main(tiny_args(max_iters=10))
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == saved and (tmp_path / "out" / "metrics.jsonl").exists()
    with pytest.raises(SystemExit, match="model settings differ: n_embd=32 there, 64 here"):
        train.main(tiny_args(max_iters=20, init_from="resume", n_embd=64))
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="could not read the checkpoint"):
        train.main(tiny_args(max_iters=20, init_from="resume"))
    torch.save({"model_args": {}, "model": {}}, tmp_path / "out" / "ckpt.pt")     # another codebase's
    with pytest.raises(SystemExit, match="not a checkpoint of this train.py"):
        train.main(tiny_args(max_iters=20, init_from="resume"))


def test_init_from_takes_scratch_resume_a_folder_or_a_hub_name(tmp_path):
    for value in ("scratch", "resume", str(tmp_path), "SandyResearch/parcae-140m"):
        assert train.parse_settings([f"--init_from={value}"])["init_from"] == value


@pytest.mark.parametrize("text, message", [
    ("batch_size = 4\nlr = = 3e-3\n", "mine.py, line 2: invalid syntax; a config file holds plain Python assignments"),
    ("batch_size = 4\nlr = 3e-3 * learning\n", "mine.py, line 2: NameError: name 'learning' is not defined"),
    ("batch_size = (4\n", "mine.py, line 1: '\\(' was never closed"),
])
def test_a_config_file_that_is_not_valid_python_is_one_line_naming_the_line(tmp_path, text, message):
    path = tmp_path / "mine.py"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message) as e:
        train.parse_settings([str(path)])
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_says_what_to_use():
    with pytest.raises(SystemExit, match="no CUDA GPU: use --device=cpu"):
        train.pick_device("cuda", local_rank=0)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu0"])
def test_a_device_torch_does_not_know_is_one_line_with_the_choices(name):
    with pytest.raises(SystemExit, match=f"^device='{name}' is not a device: use auto, cpu, cuda, cuda:1, mps"):
        train.pick_device(name, local_rank=0)


def test_missing_data_says_how_to_make_it(tiny_args, tmp_path):
    with pytest.raises(SystemExit, match="python prepare.py"):
        train.main(tiny_args(data_dir=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("text, message", [
    ('{"tokenizer": "char", "vocab_size": 28', "meta.json is damaged \\(Expecting ',' delimiter: line 1 column 39"),
    ("\xff\xfe", "meta.json is damaged"),
    ('{"tokenizer": "char"}', "meta.json has no vocab_size"),
    ('[28]', "meta.json has no vocab_size"),
], ids=["cut off", "not text", "no vocab_size", "not an object"])
def test_a_damaged_meta_json_is_one_line_saying_to_remake_the_data(tiny_args, tiny_data, text, message):
    (tiny_data / "meta.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(SystemExit, match=message) as e:
        train.main(tiny_args())
    assert "prepare.py" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cut, message", [(1, "val.bin is 3,601 bytes, not a whole number of 2-byte tokens: "
                                                "it is truncated; copy it again, or remake the data"),
                                          (None, "val.bin holds 0 tokens; training needs more than block_size=32")],
                         ids=["half a token short", "empty"])
def test_a_truncated_token_file_is_named_before_anything_starts(tiny_args, tiny_data, tmp_path, cut, message):
    data = (tiny_data / "val.bin").read_bytes()
    (tiny_data / "val.bin").write_bytes(data[:-cut] if cut else b"")
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_args())
    assert not (tmp_path / "out").exists()


def test_token_ids_beyond_the_vocabulary_are_refused_before_the_first_forward(tiny_args, tiny_data, tmp_path):
    """A meta.json from another tokenizer: the data's largest id (the end-of-text token, 28, last in the
    file) does not fit a vocabulary of 28."""
    meta = json.loads((tiny_data / "meta.json").read_text())
    (tiny_data / "meta.json").write_text(json.dumps({**meta, "vocab_size": meta["eot_token"]}))
    with pytest.raises(SystemExit, match="train.bin holds token id 28, but its meta.json says vocab_size=28: the "
                                         "data and meta.json come from different tokenizers"):
        train.main(tiny_args())
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_args, tmp_path, monkeypatch):
    nan_from_13 = lambda step, loss: loss * float("nan") if step >= 13 else loss
    monkeypatch.setattr(train, "GPT", with_training_forward(nan_from_13))
    with pytest.raises(SystemExit, match=r"stopped at step 13: the training loss is nan .*still holds step 10"):
        train.main(tiny_args())
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())
    assert max(r["step"] for r in metrics(tmp_path / "out")) == 12


@pytest.mark.parametrize("blows_up_at, stops", [(1, False), (2, True)], ids=["test-time depth", "training depth"])
def test_a_non_finite_validation_loss_stops_training_only_at_the_training_depth(
        tiny_args, tmp_path, monkeypatch, blows_up_at, stops):
    """TINY trains at mean_loops = 2 and evaluates at 1 and 2 loops. A loop that diverges only at a
    depth it was not trained for is a result to log (as null), not a reason to stop."""
    class Diverging(train.GPT):
        def forward(self, idx, targets=None, loops=None, **kwargs):
            logits, loss = super().forward(idx, targets, loops=loops, **kwargs)
            return logits, loss * float("inf") if not self.training and loops == blows_up_at else loss
    monkeypatch.setattr(train, "GPT", Diverging)
    if stops:
        with pytest.raises(SystemExit, match="stopped at step 10: the validation loss is not finite .*no checkpoint"):
            train.main(tiny_args())
        assert not (tmp_path / "out" / "ckpt.pt").exists()
    else:
        train.main(tiny_args())
        evals = [r["val_loss"] for r in metrics(tmp_path / "out") if "val_loss" in r]
        assert len(evals) == 3 and all(v["1"] is None and v["2"] < 10 for v in evals)
        assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 30


class NanGradient(torch.autograd.Function):
    """The identity going forward; a NaN gradient coming back."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_step_with_a_non_finite_gradient_is_skipped_and_training_goes_on(tiny_args, tmp_path, monkeypatch):
    nan_grad_at_5 = lambda step, loss: NanGradient.apply(loss) if step == 5 else loss
    monkeypatch.setattr(train, "GPT", with_training_forward(nan_grad_at_5))
    train.main(tiny_args(max_iters=12))
    records = {r["step"]: r for r in metrics(tmp_path / "out") if "val_loss" not in r}
    assert records[5]["skipped"] is True and records[5]["grad_norm"] is None   # NaN is written as null
    assert sorted(records) == list(range(12))
    assert all(r["loss"] < records[0]["loss"] for s, r in records.items() if s > 5)
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 12


# -----------------------------------------------------------------------------
# DDP on CPU


@pytest.mark.parametrize("randomness", [dict(depth_sampling="fixed", init_state="zero"), {}],
                         ids=["fixed-depth", "sampled-depth"])
def test_two_ddp_processes_train_like_one_process_with_the_same_global_batch(tiny_args, tmp_path, randomness):
    # 1 process × 2 micro-steps and 2 processes × 1 micro-step read the same windows; and since
    # the depths and h_0 are drawn from a seed of the micro-batch's number, not of the rank,
    # even the sampled depths agree. Every process gets one CPU thread (a matmul's rounding depends
    # on how many threads split its sums), so each micro-batch computes the same numbers in both
    # runs, and the losses agree to the last bit: 1 process halves each micro-batch's gradient going
    # backward, DDP halves each rank's before adding them (×½ is exact), and a sum of two terms is the
    # same in either order. train.evaluate sums the validation losses in one order on any number of ranks.
    common = dict(max_iters=8, eval_interval=4, eval_iters=3, grad_accum_steps=2, **randomness)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "train.py", *tiny_args(**common, out_dir=str(tmp_path / "one"))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "train.py", *tiny_args(**common, out_dir=str(tmp_path / "two"))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "on 2 process(es)" in two.stdout
    assert "Warning" not in two.stderr, two.stderr      # no rank warns (DDP's renamed buffer-sync argument)
    single, ddp = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(ddp) == list(range(8)) and ddp[7] < ddp[0]
    assert ddp == single
    val = lambda d: [r["val_loss"] for r in metrics(d) if "val_loss" in r]
    assert len(val(tmp_path / "two")) == 2 and val(tmp_path / "two") == val(tmp_path / "one")
