"""
CORE, the downstream score of the paper's Table 5 (from the DCLM paper, computed as the authors' release
computes it): in-context accuracy on 22 tasks, each centred on its random baseline, averaged. For a
train.py checkpoint or one of the authors' pretrained models, at any number of loops.

    python bench/core.py --init_from=SandyResearch/parcae-1.3b --download     # Table 5: T = μ_rec, 3 seeds
    python bench/core.py --out_dir=out --loops 1 2 4 8 16 --suite core_extended
    python bench/core.py --make_demo_bundle out/demo_bundle                  # a synthetic bundle, offline

The tasks come as one bundle, eval_bundle/: core.yaml lists them (label, dataset_uri, icl_task_type,
num_fewshot, continuation_delimiter), eval_data/*.jsonl holds their items, eval_meta_data.csv each
one's random baseline in percent. The release fetches it from BUNDLE_URL; --download does the same,
into --bundle (default $PARCAE_CACHE/eval_bundle, else ~/.cache/parcae/eval_bundle, where the release
keeps it). --suite core_extended adds the 24 tasks of EXTENDED and reports both scores from one pass.

How an item is scored, as in the release:
  - a task's items are shuffled once (random.Random(1337)), then cut to --max_per_task;
  - item i at seed s gets num_fewshot examples, random.Random(s + i).sample of the other items;
  - each example is rendered as its context, the delimiter and its answer, then a blank line; the item
    follows, once per choice (multiple_choice: the query with each choice; schema: each context option
    with the continuation; language_modeling: the context, then with the exact continuation);
  - every prompt is tokenized after a BOS token (the tokenizer's, or for our char and GPT-2 data the
    end-of-text token that starts each document); the continuation's tokens follow the prompts'
    longest common prefix (multiple choice), are their longest common suffix (schema), or follow the
    prompt without the continuation (language modelling); a prompt longer than the model's block_size
    loses its first tokens;
  - one forward at T loops gives every token's cross-entropy; the choice whose continuation has the
    lowest mean wins (a language-modelling item is right when the greedy prediction is every token);
  - accuracy is the fraction right; centred, (acc − b) / (1 − b) with b the baseline; CORE is the mean
    of the centred accuracies over core.yaml's tasks. The release runs seeds 1234, 2345 and 3456 and
    reports the mean ± the population standard deviation.
Parcae draws a fresh h_0 in every forward; we seed torch with the seed before each task, so a run
repeats exactly on the same hardware. Several items share a forward (--batch_tokens; right-padded, and
causal attention never looks at the padding). The release runs one item per forward, as --batch_tokens 1
does: the scores differ only by rounding and by which h_0 each token draws.

Writes core_<model>.json (per loop count and seed, each task's accuracy and centred accuracy, and
CORE), core_<model>.md (×100, as the paper reports it) and, for several loop counts, core_<model>.png.
"""

import argparse
import csv
import json
import os
import random
import re
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import train
from loops import autocast_for

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
SEEDS = (1234, 2345, 3456)
SHUFFLE_SEED = 1337
PAD = 0             # the padding token id; causal attention never reads it
FIELDS = {"multiple_choice": ("query", "choices", "gold"),
          "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}

# Core-Extended: the release lists its 24 further tasks in code. (label, file under eval_data/, shots,
# type, delimiter); a task without a file is skipped, one without a baseline in the CSV takes 25 %.
EXTENDED = [
    ("mmlu_zeroshot", "world_knowledge/mmlu.jsonl", 0, "multiple_choice", "Answer: "),
    ("mmlu_fewshot", "world_knowledge/mmlu.jsonl", 5, "multiple_choice", "\nAnswer: "),
    ("siqa", "commonsense_reasoning/siqa.jsonl", 10, "multiple_choice", " "),
    ("bigbench_misconceptions", "world_knowledge/bigbench_misconceptions.jsonl", 10, "multiple_choice", " "),
    ("bigbench_novel_concepts", "commonsense_reasoning/bigbench_novel_concepts.jsonl", 10, "multiple_choice", " "),
    ("bigbench_strange_stories", "commonsense_reasoning/bigbench_strange_stories.jsonl", 10, "multiple_choice", " "),
    ("bigbench_strategy_qa", "commonsense_reasoning/bigbench_strategy_qa.jsonl", 10, "multiple_choice", " "),
    ("bigbench_conlang_translation", "language_understanding/bigbench_conlang_translation.jsonl", 0,
     "language_modeling", " "),
    ("bigbench_conceptual_combinations", "language_understanding/bigbench_conceptual_combinations.jsonl", 10,
     "multiple_choice", " "),
    ("bigbench_elementary_math_qa", "symbolic_problem_solving/bigbench_elementary_math_qa.jsonl", 10,
     "multiple_choice", " "),
    ("bigbench_logical_deduction", "symbolic_problem_solving/bigbench_logical_deduction.jsonl", 10,
     "multiple_choice", " "),
    ("simple_arithmetic_nospaces", "symbolic_problem_solving/simple_arithmetic_nospaces.jsonl", 10,
     "language_modeling", " "),
    ("simple_arithmetic_withspaces", "symbolic_problem_solving/simple_arithmetic_withspaces.jsonl", 10,
     "language_modeling", " "),
    ("math_qa", "symbolic_problem_solving/math_qa.jsonl", 10, "multiple_choice", " "),
    ("logi_qa", "symbolic_problem_solving/logi_qa.jsonl", 10, "multiple_choice", "\nAnswer: "),
    ("pubmed_qa_labeled", "reading_comprehension/pubmed_qa_labeled.jsonl", 10, "language_modeling", " "),
    ("agi_eval_lsat_rc", "reading_comprehension/agi_eval_lsat_rc.jsonl", 3, "multiple_choice", " "),
    ("agi_eval_lsat_lr", "reading_comprehension/agi_eval_lsat_lr.jsonl", 3, "multiple_choice", " "),
    ("bigbench_understanding_fables", "reading_comprehension/bigbench_understanding_fables.jsonl", 10,
     "multiple_choice", " "),
    ("agi_eval_sat_en", "reading_comprehension/agi_eval_sat_en.jsonl", 3, "multiple_choice", " "),
    ("winogender_mc_female", "safety/winogender_mc_female.jsonl", 10, "multiple_choice", " "),
    ("winogender_mc_male", "safety/winogender_mc_male.jsonl", 10, "multiple_choice", " "),
    ("enterprise_pii_classification", "safety/enterprise_pii_classification.jsonl", 10, "multiple_choice", " "),
    ("bbq", "safety/bbq.jsonl", 3, "multiple_choice", " "),
]
EXTENDED_BASELINE = 25.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=default_bundle(), help="the eval_bundle folder, holding core.yaml "
                                                             "(default: %(default)s)")
    p.add_argument("--download", action="store_true", help="first fetch and unpack the bundle from BUNDLE_URL "
                                                           "if --bundle has none")
    p.add_argument("--make_demo_bundle", metavar="DIR", help="write a synthetic bundle in the same layout to DIR "
                   "(Python-flavoured tasks, a few hundred items each) and exit: for a speed run without network")
    p.add_argument("--out_dir", default="out", help="the folder holding ckpt.pt (train.py's out_dir)")
    p.add_argument("--init_from", help="a pretrained model instead: a Hugging Face repo such as "
                                       "SandyResearch/parcae-1.3b, or a folder holding its files (hub.py)")
    p.add_argument("--loops", nargs="+", type=int, help="test-time loop counts (default: the model's mean_loops)")
    p.add_argument("--suite", choices=("core", "core_extended"), default="core",
                   help="core: the 22 tasks of core.yaml; core_extended: those and 24 more, both scores in one pass")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="few-shot draws (and h_0 draws)")
    p.add_argument("--max_per_task", type=int, help="score only the first N items of each task (default: all)")
    p.add_argument("--batch_tokens", type=int, default=8192, help="pack items into forwards of at most this many "
                   "(padded) tokens; the logits take batch_tokens × vocabulary × 2 bytes on a GPU, × 4 on a CPU")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps ...")
    p.add_argument("--results_dir", default=os.path.join(common.ROOT, "bench", "results"), help="JSON, Markdown, PNG")
    args = p.parse_args(argv)
    if args.make_demo_bundle:
        make_demo_bundle(args.make_demo_bundle)
        print(f"wrote a synthetic CORE bundle to {args.make_demo_bundle}: "
              f"python bench/core.py --bundle {args.make_demo_bundle} --out_dir=...")
        return None
    if args.max_per_task is not None and args.max_per_task < 1:
        raise SystemExit("--max_per_task must be at least 1 (leave it out to score every item)")
    if args.batch_tokens < 1 or (args.loops and min(args.loops) < 1):
        raise SystemExit("--batch_tokens and --loops must be at least 1")

    if args.download and not os.path.isfile(os.path.join(args.bundle, "core.yaml")):
        download_bundle(args.bundle)
    tasks, skipped = read_bundle(args.bundle, args.suite, args.max_per_task)
    device = train.pick_device(args.device, local_rank=0)
    model, meta, name = load_model(args)
    model.to(device).eval()
    if model.config.looped:
        loops = sorted(set(args.loops or [model.config.mean_loops]))
    elif args.loops and args.loops != [1]:
        raise SystemExit(f"{name} is a plain Transformer: it has no loop to vary (drop --loops)")
    else:
        loops = [1]         # every layer once; train.py's evaluation calls it 1 loop too
    from prepare import load_tokenizer
    encode = load_tokenizer(meta)[0]
    # the authors' tokenizer has a BOS token; our char and GPT-2 data begin a document after an end-of-text
    bos = meta.get("bos_token", meta["eot_token"])
    check_encodable(tasks, encode, name)

    n_items = sum(len(t["items"]) for t in tasks)
    print(f"{name}: {len(tasks)} tasks, {n_items:,} items, at T = {', '.join(map(str, loops))}, seeds "
          f"{', '.join(map(str, args.seeds))}" + (f"; skipped (no file): {', '.join(skipped)}" if skipped else ""))
    results = {"model": name, "checkpoint": args.init_from or os.path.join(args.out_dir, "ckpt.pt"),
               "mean_loops": model.config.mean_loops if model.config.looped else None,
               "block_size": model.config.block_size, "bundle": args.bundle, "suite": args.suite,
               "seeds": args.seeds, "max_per_task": args.max_per_task, "batch_tokens": args.batch_tokens,
               "tasks": {t["label"]: {k: t[k] for k in ("type", "shots", "delimiter", "baseline", "core")}
                         | {"items": len(t["items"])} for t in tasks},
               "skipped": skipped, "environment": common.environment(), "command": common.command(__file__, argv),
               "loops": {}}
    for T in loops:
        results["loops"][str(T)] = evaluate(model, tasks, T, args.seeds, encode, bos, device, args.batch_tokens, name)
    file = "core_" + re.sub(r"[^\w.-]", "_", name)
    os.makedirs(args.results_dir, exist_ok=True)
    print(common.write_results(args.results_dir, file, results, markdown))
    if len(loops) > 1:
        plot(results, os.path.join(args.results_dir, file + ".png"))
    return results


# -----------------------------------------------------------------------------
# the bundle


def default_bundle():
    return os.path.join(os.environ.get("PARCAE_CACHE") or os.path.expanduser("~/.cache/parcae"), "eval_bundle")


def download_bundle(bundle):
    """Fetch BUNDLE_URL beside `bundle` and unpack the zip's eval_bundle/ folder as `bundle`."""
    import prepare
    parent = os.path.dirname(os.path.abspath(bundle))
    if os.path.exists(bundle) and os.listdir(bundle):
        raise SystemExit(f"{bundle} exists but holds no core.yaml: move it away, or pass --bundle another folder")
    archive = os.path.join(parent, "eval_bundle.zip")
    try:
        prepare.download(BUNDLE_URL, archive, f"download it by hand and unzip it into {parent}")
    except SystemExit as e:         # prepare.py's words, without its name: this is core.py
        raise SystemExit(str(e).removeprefix("prepare.py: "))
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile:
            raise SystemExit(f"{archive} is not a whole zip file: delete it and download it again")
        unpacked = os.path.join(tmp, "eval_bundle")
        if not os.path.isfile(os.path.join(unpacked, "core.yaml")):
            raise SystemExit(f"{archive} holds no eval_bundle/core.yaml: is it the CORE bundle?")
        if os.path.exists(bundle):
            os.rmdir(bundle)            # empty (checked above)
        os.replace(unpacked, bundle)
    os.remove(archive)


def read_bundle(bundle, suite="core", max_per_task=None):
    """
    (tasks, skipped labels). Each task is a dict: label, file, type, shots, delimiter, baseline (percent),
    core (listed in core.yaml) and items, shuffled and cut. Every problem is one line: a missing bundle
    says where it comes from; a malformed file, or an item without its fields, says which and where.
    """
    spec_path = os.path.join(bundle, "core.yaml")
    if not os.path.isfile(spec_path):
        raise SystemExit(f"no CORE bundle at {bundle} (no core.yaml): the release downloads it from {BUNDLE_URL}; "
                         f"unzip it into {os.path.dirname(os.path.abspath(bundle))} (it holds eval_bundle/), pass "
                         "--bundle DIR, or add --download")
    try:
        import yaml
    except ImportError:
        raise SystemExit("reading core.yaml needs PyYAML: pip install pyyaml (requirements.txt names it)")
    try:
        with open(spec_path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SystemExit(f"{spec_path} is not readable YAML ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         "unpack the bundle again")
    entries = spec.get("icl_tasks") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SystemExit(f"{spec_path} has no list of icl_tasks: is it the CORE bundle's core.yaml?")
    tasks = [yaml_task(entry, i, spec_path) for i, entry in enumerate(entries)]
    skipped = []
    if suite == "core_extended":
        for label, file, shots, kind, delimiter in EXTENDED:
            if os.path.isfile(os.path.join(bundle, "eval_data", file)):
                tasks.append(dict(label=label, file=file, type=kind, shots=shots, delimiter=delimiter, core=False))
            else:
                skipped.append(label)
    baselines = read_baselines(os.path.join(bundle, "eval_meta_data.csv"))
    for t in tasks:
        if t["label"] not in baselines and t["core"]:
            raise SystemExit(f"eval_meta_data.csv has no row for core.yaml's task {t['label']!r}: "
                             "unpack the bundle again")
        t["baseline"] = baselines.get(t["label"], EXTENDED_BASELINE)
        t["items"] = read_items(os.path.join(bundle, "eval_data", t["file"]), t["type"])
        random.Random(SHUFFLE_SEED).shuffle(t["items"])
        t["items"] = t["items"][:max_per_task]
        if t["shots"] >= len(t["items"]):
            hint = " (raise --max_per_task)" if max_per_task else ""
            raise SystemExit(f"task {t['label']} has {len(t['items'])} items: too few to draw {t['shots']} other "
                             f"items as few-shot examples for each{hint}")
    return tasks, skipped


def yaml_task(entry, i, path):
    need = ("label", "dataset_uri", "icl_task_type", "num_fewshot")
    if not isinstance(entry, dict) or any(k not in entry for k in need):
        raise SystemExit(f"{path}: icl_tasks[{i}] needs {', '.join(need)}")
    kind, shots = entry["icl_task_type"], entry["num_fewshot"]
    if kind not in FIELDS:
        raise SystemExit(f"{path}: task {entry['label']!r} has icl_task_type {kind!r}, not one of {', '.join(FIELDS)}")
    if not (isinstance(shots, list) and shots and type(shots[0]) is int and shots[0] >= 0):
        raise SystemExit(f"{path}: task {entry['label']!r} has num_fewshot {shots!r}, not a list of counts "
                         "(its first one is used)")
    delimiter = entry.get("continuation_delimiter", " ")
    return dict(label=str(entry["label"]), file=str(entry["dataset_uri"]), type=kind, shots=shots[0],
                delimiter=str(delimiter), core=True)


def read_baselines(path):
    """{task label: random baseline in percent} from eval_meta_data.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read {path} ({type(e).__name__}): the bundle is incomplete, unpack it again")
    if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or ()):
        raise SystemExit(f"{path} has no 'Eval Task' and 'Random baseline' columns: unpack the bundle again")
    try:
        return {row["Eval Task"]: float(row["Random baseline"]) for row in rows}
    except (TypeError, ValueError):
        raise SystemExit(f"{path}: a 'Random baseline' is not a number: unpack the bundle again")


def read_items(path, kind):
    """A task file's items, each checked for its type's fields; numbers written as text become text."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read {path} ({type(e).__name__}): the bundle is incomplete, unpack it again")
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        problem = item_problem(item, kind)
        if problem:
            raise SystemExit(f"{path}, line {n}: {problem}")
        items.append(item)
    return items


def item_problem(item, kind):
    """What is wrong with a task item (None if nothing); it is made ready to render on the way."""
    need = FIELDS[kind]
    if not isinstance(item, dict):
        return "not a JSON object"
    missing = [k for k in need if k not in item]
    if missing:
        return f"a {kind} item needs {', '.join(need)}; this one has no {', '.join(missing)}"

    def text(v):
        return str(v) if isinstance(v, (str, int, float)) and not isinstance(v, bool) else None
    for k in need:
        if k in ("choices", "context_options"):
            options = [text(v) for v in item[k]] if isinstance(item[k], list) else [None]
            if not options or None in options:
                return f"its {k} is not a list of texts"
            item[k] = options
        elif k != "gold":
            if text(item[k]) is None:
                return f"its {k} is not a text"
            item[k] = text(item[k])
    if "gold" in need:
        options = item.get("choices", item.get("context_options"))
        if type(item["gold"]) is not int or not 0 <= item["gold"] < len(options):
            return f"its gold {item['gold']!r} is not the index of one of its {len(options)} options"
    return None


def check_encodable(tasks, encode, name):
    """Refuse, before any scoring, a tokenizer that cannot write some character of the bundle (a char
    vocabulary without it): one character at a time, since a byte-level BPE writes every one."""
    chars = {}          # task label -> the characters of its prompts
    for t in tasks:
        texts = [t["delimiter"], "\n"]  # "\n": the blank line after each few-shot example
        for item in t["items"]:
            texts += [v for k in FIELDS[t["type"]] if k != "gold" for v in
                      (item[k] if isinstance(item[k], list) else [item[k]])]
        chars[t["label"]] = set().union(*texts)
    for ch in sorted(set().union(*chars.values())):
        try:
            encode(ch)
        except ValueError as e:
            label = next(label for label, c in chars.items() if ch in c)
            raise SystemExit(f"{name}'s tokenizer cannot encode the text of task {label} ({e}): a char-level "
                             "model can only be scored on text made of the characters it was trained on")


# -----------------------------------------------------------------------------
# an item: few-shot draw, prompts, tokens, the continuation's place


def fewshot(items, i, shots, seed):
    """The few-shot examples of item i: random.Random(seed + i).sample of the other items. A sample picks
    positions in its population, so sampling positions among the n − 1 others and skipping i draws the
    same items as sampling the list of the others, without building that list for every item."""
    picks = random.Random(seed + i).sample(range(len(items) - 1), shots)
    return [items[j + (j >= i)] for j in picks]


def render(task, item, examples):
    """The item's prompts, as the release renders them: one per choice (multiple choice) or per context
    option (schema); for language modelling, the prompt without the continuation and the one with it.
    d is the task's continuation delimiter; every few-shot example ends with a blank line."""
    d, kind = task["delimiter"], task["type"]
    if kind == "multiple_choice":
        shots = "".join(f"{e['query']}{d}{e['choices'][e['gold']]}\n\n" for e in examples)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{e['context_options'][e['gold']]}{d}{e['continuation']}\n\n" for e in examples)
        return [f"{shots}{option}{d}{item['continuation']}" for option in item["context_options"]]
    shots = "".join(f"{e['context'].strip()}{d}{e['continuation']}\n\n" for e in examples)
    without = f"{shots}{item['context'].strip()}{d}"
    return [without.strip(), without + item["continuation"]]


def common_prefix(seqs):
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def locate(kind, prompts, encode, bos):
    """The item's sequences as (tokens, start, end), its continuation being tokens[start:end]."""
    seqs = [[bos] + encode(p) for p in prompts]
    if kind == "multiple_choice":       # after what all choices share
        n = common_prefix(seqs)
        return [(s, n, len(s)) for s in seqs]
    if kind == "schema":                # what all options share at their end
        n = common_prefix([s[::-1] for s in seqs])
        return [(s, len(s) - n, len(s)) for s in seqs]
    without, full = seqs
    if full[:len(without)] != without:
        raise ValueError("the tokens of its prompt without the continuation are not a prefix of those with it")
    return [(full, len(without), len(full))]


def crop(seqs, block_size):
    """Cut sequences longer than block_size from the left, moving the continuation with them. At least one
    token must stay before the continuation, to predict its first one."""
    out = []
    for tokens, start, end in seqs:
        cut = max(0, len(tokens) - block_size)
        if start - cut < 1:
            raise ValueError(f"its continuation of {end - start} tokens does not fit in a context of {block_size}")
        out.append((tokens[cut:], start - cut, end - cut))
    return out


def batches(task, seed, encode, bos, block_size, batch_tokens, name):
    """The task's items as batches: ([(item index, its number of sequences)], sequences), each batch at most
    batch_tokens tokens once padded to its longest sequence (an item too long for that goes alone)."""
    items, seqs, longest = [], [], 0
    for i, item in enumerate(task["items"]):
        try:
            prompts = render(task, item, fewshot(task["items"], i, task["shots"], seed))
            new = crop(locate(task["type"], prompts, encode, bos), block_size)
        except ValueError as e:         # a tokenizer error, a continuation too long
            raise SystemExit(f"{name} cannot score item {i} of {task['label']}: {e}")
        length = max(longest, *(len(t) for t, _, _ in new))
        if seqs and (len(seqs) + len(new)) * length > batch_tokens:
            yield items, seqs
            items, seqs, length = [], [], max(len(t) for t, _, _ in new)
        items.append((i, len(new)))
        seqs += new
        longest = length
    if seqs:
        yield items, seqs


# -----------------------------------------------------------------------------
# scoring


@torch.no_grad()
def score(model, seqs, loops, device):
    """
    One forward over the sequences (right-padded with PAD): for each, the mean cross-entropy of its
    continuation's tokens, and whether the greedy prediction is every one of them. Logits at position p
    predict token p + 1, so a continuation tokens[s:e] is predicted at positions s − 1 ... e − 2; only
    those rows of the logits are turned into fp32 log-probabilities. Returns device tensors: reading them
    waits for the GPU, which the caller does after launching the next batch.
    """
    B, L = len(seqs), max(len(t) for t, _, _ in seqs)
    idx = torch.full((B, L), PAD, dtype=torch.long)
    for b, (tokens, _, _) in enumerate(seqs):
        idx[b, :len(tokens)] = torch.tensor(tokens)
    start = torch.tensor([s for _, s, _ in seqs])
    count = torch.tensor([e - s for _, s, e in seqs])
    offset = torch.arange(max(1, int(count.max())))
    inside = offset < count[:, None]                                   # (B, longest continuation)
    where = torch.where(inside, start[:, None] - 1 + offset, 0)         # the predicting positions
    targets = idx.gather(1, where + 1)
    if device.type == "cuda":        # copy from pinned memory without waiting for the GPU to be idle
        idx, where, targets, inside, count = (t.pin_memory().to(device, non_blocking=True)
                                              for t in (idx, where, targets, inside, count))
    with autocast_for(device):
        logits, _ = model(idx, loops=loops)
    picked = logits[torch.arange(B, device=device)[:, None], where].float()      # (B, C, vocab)
    nll = F.cross_entropy(picked.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    mean_nll = (nll * inside).sum(1) / count
    greedy = ((picked.argmax(-1) == targets) | ~inside).all(1)
    return mean_nll, greedy


def evaluate_task(model, task, loops, seed, encode, bos, device, batch_tokens, name):
    """(accuracy, sequences, tokens) of one task at `loops` and `seed`."""
    torch.manual_seed(seed)             # h_0 draws: the same for this task whatever else runs
    right, n_seqs, n_tokens = 0, 0, 0
    bar = tqdm(total=len(task["items"]), desc=f"T={loops} seed {seed} {task['label']}", unit=" items", leave=False)

    def collect(batch_items, out):
        nonlocal right
        mean_nll, greedy = (x.tolist() for x in out)
        k = 0
        for i, n in batch_items:
            if task["type"] == "language_modeling":
                right += greedy[k]
            else:       # the lowest mean loss wins; the first of equal ones, as the release's list.index
                losses = mean_nll[k:k + n]
                right += losses.index(min(losses)) == task["items"][i]["gold"]
            k += n
        bar.update(len(batch_items))

    pending = None
    for batch_items, seqs in batches(task, seed, encode, bos, model.config.block_size, batch_tokens, name):
        out = score(model, seqs, loops, device)
        if pending:
            collect(*pending)           # waits for the previous batch while this one runs
        pending = batch_items, out
        n_seqs, n_tokens = n_seqs + len(seqs), n_tokens + sum(len(t) for t, _, _ in seqs)
    collect(*pending)
    bar.close()
    return right / len(task["items"]), n_seqs, n_tokens


def centered(accuracy, baseline):
    """Accuracy centred on the task's random baseline (percent): 0 at chance, 1 when always right."""
    b = 0.01 * baseline
    return (accuracy - b) / (1 - b)


def evaluate(model, tasks, loops, seeds, encode, bos, device, batch_tokens, name):
    """
    At one loop count: per seed, each task's accuracy and centred accuracy, CORE (the mean over core.yaml's
    tasks) and, when there are others, Core-Extended (over all), with the sequences, tokens and seconds
    it took; then the mean and population standard deviation of each over the seeds.
    """
    per_seed = {}
    for seed in seeds:
        t0, scores, n_seqs, n_tokens = time.time(), {}, 0, 0
        for task in tasks:
            acc, seqs, toks = evaluate_task(model, task, loops, seed, encode, bos, device, batch_tokens, name)
            scores[task["label"]] = {"accuracy": acc, "centered": centered(acc, task["baseline"])}
            n_seqs, n_tokens = n_seqs + seqs, n_tokens + toks
            print(f"T={loops} seed {seed} | {task['label']:<34} accuracy {acc:.4f} | centred "
                  f"{scores[task['label']]['centered']:+.4f}", flush=True)
        r = {"tasks": scores, "core": float(np.mean([scores[t["label"]]["centered"] for t in tasks if t["core"]]))}
        if not all(t["core"] for t in tasks):
            r["core_extended"] = float(np.mean([s["centered"] for s in scores.values()]))
        r.update(sequences=n_seqs, tokens=n_tokens, seconds=time.time() - t0)
        per_seed[str(seed)] = r
        print(f"T={loops} seed {seed}: CORE {r['core']:.4f}" + (f", Core-Extended {r['core_extended']:.4f}"
                                                               if "core_extended" in r else ""), flush=True)
    runs = list(per_seed.values())

    def stats(values):
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}      # np.std divides by n
    mean = {k: stats([r[k] for r in runs]) for k in ("core", "core_extended") if k in runs[0]}
    mean["tasks"] = {t["label"]: {k: stats([r["tasks"][t["label"]][k] for r in runs]) for k in ("accuracy", "centered")}
                     for t in tasks}
    return {"seeds": per_seed, "mean": mean}


# -----------------------------------------------------------------------------
# loading the model


def load_model(args):
    """(model on the CPU, its tokenizer's meta.json fields, a short name) of --init_from or --out_dir."""
    if args.init_from:
        import hub
        model, meta = hub.load_pretrained(args.init_from)
        return model, meta, os.path.basename(os.path.normpath(args.init_from))
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = train.load_checkpoint(path)
    model = train.model_from_checkpoint(ckpt, path)
    meta = ckpt.get("meta") or {}
    if "tokenizer" not in meta:
        raise SystemExit(f"{path} does not say which tokenizer its data used; retrain it with this train.py")
    return model, meta, os.path.basename(os.path.abspath(args.out_dir))


# -----------------------------------------------------------------------------
# the report


def markdown(results):
    loops = list(results["loops"])
    extended = "core_extended" in results["loops"][loops[0]]["mean"]
    seeds = ", ".join(map(str, results["seeds"]))
    items = "all items" if results["max_per_task"] is None else f"at most {results['max_per_task']} items per task"
    pm = lambda s: f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"        # noqa: E731
    lines = [f"CORE of `{results['model']}` (μ_rec {results['mean_loops'] or '–'}) on "
             f"`{os.path.basename(os.path.normpath(results['bundle']))}`: "
             f"{len(results['tasks'])} tasks, {items}, seeds {seeds}. Mean ± population standard deviation over "
             "the seeds, ×100 as the paper's Table 5 gives them.", "",
             "| T | CORE | " + ("Core-Extended | " if extended else "") + "sequences per seed | seconds per seed |",
             "|---|---|" + ("---|" if extended else "") + "---|---|"]
    for T in loops:
        r = results["loops"][T]
        runs = list(r["seeds"].values())
        ext = f"{pm(r['mean']['core_extended'])} | " if extended else ""
        lines.append(f"| {T} | {pm(r['mean']['core'])} | {ext}{runs[0]['sequences']:,} | "
                     f"{np.mean([x['seconds'] for x in runs]):.1f} |")
    lines += ["", "Per task: centred accuracy (accuracy), ×100, mean over the seeds.", "",
              "| task | type | shots | baseline | " + " | ".join(f"T={T}" for T in loops) + " |",
              "|---|---|---|---|" + "---|" * len(loops)]
    short = {"multiple_choice": "choice", "schema": "schema", "language_modeling": "LM"}
    for label, t in results["tasks"].items():
        cells = []
        for T in loops:
            m = results["loops"][T]["mean"]["tasks"][label]
            cells.append(f"{pm(m['centered'])} ({100 * m['accuracy']['mean']:.1f})")
        lines.append(f"| {label}{'' if t['core'] else ' (ext.)'} | {short[t['type']]} | {t['shots']} | "
                     f"{t['baseline']:g} | " + " | ".join(cells) + " |")
    if results["skipped"]:
        lines += ["", f"Skipped, no file in the bundle: {', '.join(results['skipped'])}."]
    return "\n".join(lines) + "\n" + common.provenance(results)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    T = [int(t) for t in results["loops"]]
    for key, label in (("core", "CORE"), ("core_extended", "Core-Extended")):
        if key in results["loops"][str(T[0])]["mean"]:
            stats = [results["loops"][str(t)]["mean"][key] for t in T]
            ax.errorbar(T, [100 * s["mean"] for s in stats], yerr=[100 * s["std"] for s in stats], fmt="o-",
                        capsize=3, label=label)
    if results["mean_loops"]:
        ax.axvline(results["mean_loops"], color="gray", ls=":", lw=0.8, label="training mean μ_rec")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test-time loops T")
    ax.set_ylabel(f"score ×100 (± std over {len(results['seeds'])} seeds)")
    ax.set_title(f"{results['model']}: CORE against test-time depth", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# a synthetic bundle in the same layout, for a run without network


WORDS = ("total", "count", "value", "items", "name", "path", "data", "result", "index", "key", "line", "text",
         "size", "node", "parts", "limit", "offset", "buffer", "config", "state")
FUNCS = ("len", "max", "min", "sorted", "str", "int", "list", "sum", "repr", "tuple")


def demo_items(kind, rng):
    """One item of a synthetic Python-flavoured task, which a model trained on Python code can learn."""
    a, b, c = rng.sample(WORDS, 3)
    if kind == "multiple_choice":       # which bracket closes the line
        k = rng.randrange(3)
        query = (f"{a} = {rng.choice(FUNCS)}({b}", f"{a} = [{b}, {c}", f"{a} = {{'{b}': {c}")[k]
        return {"query": query, "choices": [")", "]", "}"], "gold": k}
    if kind == "schema":                # which line a method signature follows
        options = [f"def {a}", f"class {a}", f"{a} ="]
        rng.shuffle(options)
        return {"context_options": options, "continuation": "(self, other):", "gold": options.index(f"def {a}")}
    return {"context": f"    def __init__(self, {a}):\n        self.{a} =", "continuation": f" {a}"}


DEMO = [  # label, file, type, shots, delimiter, baseline (percent)
    ("demo_brackets", "demo/brackets.jsonl", "multiple_choice", 10, "", 33.33),
    ("demo_signatures", "demo/signatures.jsonl", "schema", 5, "", 33.33),
    ("demo_attributes", "demo/attributes.jsonl", "language_modeling", 10, "", 0.0),
]


def make_demo_bundle(folder, items=300):
    rng = random.Random(0)
    os.makedirs(os.path.join(folder, "eval_data", "demo"), exist_ok=True)
    with open(os.path.join(folder, "core.yaml"), "w") as f:
        f.write("# A synthetic bundle in the layout of the CORE eval bundle (bench/core.py --make_demo_bundle)\n"
                "icl_tasks:\n")
        for label, file, kind, shots, delimiter, _ in DEMO:
            f.write(f"- label: {label}\n  dataset_uri: {file}\n  num_fewshot: [{shots}]\n  icl_task_type: {kind}\n"
                    f"  continuation_delimiter: {json.dumps(delimiter)}\n")
    with open(os.path.join(folder, "eval_meta_data.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Random baseline"])
        w.writerows([(label, "synthetic", baseline) for label, _, _, _, _, baseline in DEMO])
    for label, file, kind, *_ in DEMO:
        with open(os.path.join(folder, "eval_data", file), "w") as f:
            f.writelines(json.dumps(demo_items(kind, rng)) + "\n" for _ in range(items))


if __name__ == "__main__":
    main()
