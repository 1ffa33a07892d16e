"""``jsnmf evaluate`` and ``jsnmf steer``: the paper's evaluation of a run's features, from the command line.

    jsnmf evaluate --run RUN --corpus labelled.json [--judge MODEL] [--kl-targets 0.1 0.5] [--layers 1] [--sae]
    jsnmf steer --run RUN --layer 1 --feature 3 --kl 0.1 [--prompt "I think that"] [--n-samples 4]

``evaluate`` scores every fitted layer of the run (:func:`jsnmf.evaluation.run.evaluate`: detection AUROC
of SNMF vs DiffMeans, optionally a TopK SAE; KL-matched steering judged by ``--judge``), writes
``RUN/evaluation.json`` and prints a short table. Layers asked for with ``--layers`` that the run has
not fitted are fitted first with the paper's preset (``jsnmf.presets.PAPER``). The judge is another
model than the one steered (a likelihood-ratio judge, ``jsnmf.evaluation.LikelihoodRatioJudge``); on
the demo model, without ``--judge``, the demo's word sets judge (``LexiconJudge``); otherwise steering
is reported without concept scores.

``steer`` finds the α at which steering along one feature reaches ``--kl`` (or takes ``--alpha``)
and prints sampled continuations of the prompt.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jsnmf.cli.options import UserError, add_command, layer_list, positive_int, say
from jsnmf.cli.steps import step_fit
from jsnmf.io.files import atomic_write_json
from jsnmf.layout import RunLayout

__all__ = ["add_parsers", "cmd_evaluate", "cmd_steer", "JUDGE_SENTENCES_PER_CONCEPT"]

JUDGE_SENTENCES_PER_CONCEPT = 5  # sentences per concept the judge is validated on


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (written by jsnmf run, or extract + fit)")
    p.add_argument("--model", default=None, help="the model (default: the one recorded in the run's store)")
    p.add_argument("--prompt", default=None, help="the steering prompt (\"I think that\", the paper's)")
    p.add_argument("--n-samples", type=positive_int, default=4, help="continuations per strength (4)")
    p.add_argument("--max-new-tokens", type=positive_int, default=50, help="tokens per continuation (50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")


def add_parsers(sub, parents) -> None:
    """Register ``evaluate`` and ``steer`` on the ``jsnmf`` sub-command parser ``sub``."""
    from jsnmf.evaluation.steering import DEFAULT_KL_TARGETS

    p = add_command(sub, "evaluate", parents=[parents], help="detection and KL-matched steering of a run's features",
                    description="Detection AUROC (SNMF vs DiffMeans, optionally a TopK SAE) and KL-matched "
                                "steering judged by --judge, on a run's fitted layers; writes RUN/evaluation.json.",
                    examples=["jsnmf evaluate --run RUN --corpus labelled.json --judge gemma3-270m",
                              "jsnmf evaluate --run RUN --corpus labelled.json --layers 6 --kl-targets 0.1 0.5 --sae",
                              "jsnmf evaluate --run shared-run --model ~/models/M --corpus labelled.json"])
    _add_run_options(p)
    p.add_argument("--corpus", required=True, help="labelled sentences: JSON records {prompt, label}, JSONL or JSON")
    p.add_argument("--layers", type=layer_list, default=None, help="layers to evaluate (all fitted)")
    p.add_argument("--judge", default=None, help="judge model (path, hub id or a jsnmf.models.fetch name); "
                                                 "never the steered model")
    p.add_argument("--kl-targets", type=positive_float, nargs="+", default=list(DEFAULT_KL_TARGETS),
                   help="KL(base ‖ steered) targets (" + " ".join(map(str, DEFAULT_KL_TARGETS)) + ")")
    p.add_argument("--steer-concepts", type=positive_int, default=None,
                   help="steer only the first N concepts (sorted labels; default all)")
    p.add_argument("--sae", action="store_true", help="also train and score a TopK SAE baseline")
    p.add_argument("--hierarchy", type=layer_list, default=None, metavar="RANKS",
                   help="also fit a hierarchical SNMF of the corpus' tokens with these decreasing ranks (e.g. 12,4) "
                        "and export its concept tree")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="rank of layers fitted here with the paper's preset (the preset's: 100)")
    p.set_defaults(handler=cmd_evaluate)

    p = add_command(sub, "steer", parents=[parents], help="print continuations steered along one feature",
                    description="Steer along feature j of layer L at the α where KL(base ‖ steered) of the "
                                "next token reaches --kl (or at --alpha), and print sampled continuations.",
                    examples=["jsnmf steer --run RUN --layer 6 --feature 3 --kl 0.5",
                              "jsnmf steer --run RUN --layer 6 --feature 3 --alpha 8 --prompt 'The weather is'"])
    _add_run_options(p)
    p.add_argument("--layer", type=non_negative_int, required=True, help="fitted layer")
    p.add_argument("--feature", type=non_negative_int, required=True, help="feature index j (column of F)")
    strength = p.add_mutually_exclusive_group(required=True)
    strength.add_argument("--kl", type=positive_float, help="KL target that sets α")
    strength.add_argument("--alpha", type=float, help="steering strength α (along the unit feature)")
    p.add_argument("--negative", action="store_true",
                   help="steer against the feature (along −v); with --kl the α is searched along −v, whose KL differs")
    p.set_defaults(handler=cmd_steer)


# ---------------------------------------------------------------- loading a run


def _open_run(args):
    """The run's layout and store (errors when the folder is not a run)."""
    from jsnmf.store import ActivationStore

    run = RunLayout.of(Path(args.run).expanduser().resolve())
    if not run.root.is_dir():
        raise FileNotFoundError(f"run directory not found: {run.root}")
    store = ActivationStore.open(run.store)
    if store.hook_site != "hook_post":
        raise UserError(f"the store {store.path} holds {store.hook_site} activations; evaluate and steer score "
                        "features at hook_post (the MLP activation, the paper's): extract with --hook hook_post")
    return run, store


def _model_path(store, override: str | None) -> str:
    path = override or store.model_path
    if not path:
        raise UserError(f"the store {store.path} records no model; pass --model")
    return path


def _load_model(store, override: str | None):
    import jsnmf.models as jm

    path = _model_path(store, override)
    say(f"loading {path}")
    return (*jm.load(path), Path(path))


def _fitted(run: RunLayout, store, layers, rank, progress: bool) -> dict:
    """``{layer: SNMF}``: the run's fits; requested layers not fitted yet are fitted with the paper's preset."""
    from jsnmf.estimator import SNMF
    from jsnmf.presets import PAPER

    if layers is None:
        layers = [layer for layer in store.layers if run.fitted(layer).is_dir()]
        if not layers:
            raise FileNotFoundError(f"no fitted layers in {run.snmf} (run `jsnmf fit` first, or pass --layers)")
    missing = [layer for layer in layers if not run.fitted(layer).is_dir()]
    if missing:
        say(f"layers {missing} are not fitted: fitting them with the paper's preset")
        settings = {k: v for k, v in PAPER.params().items() if k != "rank"}
        step_fit(store, missing, rank or PAPER.settings["rank"], settings, run.snmf, progress)
    return {layer: SNMF.load(run.fitted(layer)) for layer in layers}


def _labelled(path: str):
    from jsnmf.corpus import read_corpus

    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    corpus = read_corpus(Path(path).expanduser())
    labels = [None if d.label is None else d.label.strip() for d in corpus.documents]
    if len({lab for lab in labels if lab}) < 2:
        raise UserError(f"{path}: evaluate needs labelled sentences of at least two concepts")
    return corpus, corpus.texts, labels


def _judge(args, model_path: Path, texts, labels):
    """The concept judge (validated on the corpus), or None."""
    from jsnmf import demo
    from jsnmf.evaluation import LexiconJudge, LikelihoodRatioJudge, validate_judge
    from jsnmf.evaluation.run import Judge

    if args.judge is None:
        if not (model_path / demo.PLANTED_FILE).is_file():
            say("no --judge: steering is reported without concept scores")
            return None
        judge = LexiconJudge(demo.CONCEPTS)
        known = [c for c in sorted(set(labels) - {None}) if c in demo.CONCEPTS]
        validation = validate_judge(judge, texts, labels, concepts=known, seed=args.seed)
        return Judge("lexicon (the demo's word sets)", judge, validation, concepts=frozenset(demo.CONCEPTS))
    judge_model, judge_tokenizer, judge_path = _load_judge(args.judge, model_path)
    judge = LikelihoodRatioJudge(judge_model, judge_tokenizer)
    idx = _validation_sentences(labels)
    validation = validate_judge(judge, [texts[i] for i in idx], [labels[i] for i in idx], seed=args.seed)
    return Judge(f"likelihood ratio under {judge_path.name}", judge, validation, fluency=judge.fluency,
                 vocab_size=judge_model.config.vocab_size)


def _fetch_path(name: str):
    """A ``jsnmf.models.fetch`` name's cached file, else ``name`` itself (a path or hub id)."""
    from jsnmf.models import fetch

    return (fetch.cached_path(name) if name in fetch.RELEASES else None) or name


def _load_judge(name: str, model_path: Path):
    import jsnmf.models as jm

    path = _fetch_path(name)
    if _resolved(path) == _resolved(model_path):
        raise UserError(f"--judge {name} is the steered model itself; judge with another model (no self-judging)")
    say(f"loading the judge {path}")
    return (*jm.load(path), Path(path))


def _resolved(path_or_id) -> Path:
    from jsnmf.models.loading import resolve_checkpoint_dir

    return Path(path_or_id).resolve() if Path(path_or_id).exists() else resolve_checkpoint_dir(path_or_id)


def _validation_sentences(labels) -> list[int]:
    """The first sentences of each concept (at most JUDGE_SENTENCES_PER_CONCEPT each)."""
    chosen, seen = [], {}
    for i, label in enumerate(labels):
        if label is not None and seen.get(label, 0) < JUDGE_SENTENCES_PER_CONCEPT:
            chosen.append(i)
            seen[label] = seen.get(label, 0) + 1
    return chosen


# ---------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> int:
    from jsnmf.evaluation.generation import PAPER_PROMPT
    from jsnmf.evaluation.run import EvaluationSettings, evaluate

    corpus, texts, labels = _labelled(args.corpus)  # cheap checks before any model is loaded
    run, store = _open_run(args)
    if args.judge is not None and _resolved(_model_path(store, args.model)) == _resolved(
            (fetch_path := _fetch_path(args.judge))):
        raise UserError(f"--judge {fetch_path} is the steered model itself; judge with another model "
                        "(no self-judging)")
    progress = not args.quiet
    fitted = _fitted(run, store, args.layers, args.rank, progress)
    model, tokenizer, model_path = _load_model(store, args.model)
    judge = _judge(args, model_path, texts, labels)
    settings = EvaluationSettings(kl_targets=tuple(args.kl_targets), n_samples=args.n_samples,
                                  max_new_tokens=args.max_new_tokens, prompt=args.prompt or PAPER_PROMPT,
                                  steer_concepts=args.steer_concepts, sae=args.sae, seed=args.seed,
                                  hierarchy=tuple(args.hierarchy) if args.hierarchy else None)
    say(f"evaluating layers {', '.join(map(str, fitted))} on {len(texts)} sentences of "
         f"{len({n for lab in labels if lab for n in lab.split('+')})} concepts")
    result = evaluate(model, tokenizer, fitted, texts, labels, judge=judge, settings=settings, progress=progress)
    result.update(model=str(model_path), corpus={"path": corpus.path, "sha256": corpus.sha256},
                  fits={str(layer): _fit_record(snmf) for layer, snmf in fitted.items()})
    atomic_write_json(run.evaluation, result)
    print(summary_table(result))
    say(f"evaluation: {run.evaluation}")
    return 0


def _fit_record(snmf) -> dict:
    from jsnmf.presets import PAPER

    params = {k: v for k, v in snmf.get_params().items() if isinstance(v, (str, int, float, bool, type(None)))}
    return {"params": params, "differs_from_paper_preset": PAPER.differences(params)}


def _fmt(value, spec=".3f") -> str:
    return "—" if value is None else format(value, spec)


def summary_table(result: dict) -> str:
    """The short table ``jsnmf evaluate`` prints: detection per method, steering per method and target."""
    judge = result["judge"]
    lines = [f"judge: {judge['name']}, matched-vs-mismatched AUROC {judge['validation']['auroc']:.3f}"
             if judge else "judge: none (no concept scores)"]
    n = len(result["concepts"])
    for layer, res in result["layers"].items():
        lines += [f"layer {layer}", f"  {'method':<10} {'matched':>8} {'AUROC':>7}   "
                  + " ".join(f"{'KL ' + format(t, 'g'):>14}" for t in result["settings"]["kl_targets"])]
        for method, det in res["detection"].items():
            cells = []
            for i, _ in enumerate(result["settings"]["kl_targets"]):
                hits = [c["targets"][i] for c in res["steering"][method].values() if c["targets"][i]["reached"]]
                scores = [h["score"] for h in hits if "score" in h]
                cells.append(f"{len(hits)}/{len(res['steering'][method])} "
                             f"{_fmt(float(np.mean(scores)) if scores else None, '.2f'):>4}")
            lines.append(f"  {method:<10} {det['matched']:>5}/{n:<2} {_fmt(det['mean_auroc']):>7}   "
                         + " ".join(f"{c:>14}" for c in cells))
    lines.append("steering cells: targets reached / concepts steered, then the mean harmonic-mean score in [0, 1]")
    return "\n".join(lines)


# ---------------------------------------------------------------- steer


def cmd_steer(args) -> int:
    from jsnmf.estimator import SNMF
    from jsnmf.evaluation import alpha_for_kl, prompt_ids, steered_generate
    from jsnmf.evaluation.generation import PAPER_PROMPT
    from jsnmf.evaluation.run import steer_direction

    run, store = _open_run(args)
    path = run.fitted(args.layer)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint for layer {args.layer}: {path} is missing (fitted: "
                                f"{[layer for layer in store.layers if run.fitted(layer).is_dir()]})")
    features = SNMF.load(path).features_
    if args.feature >= features.shape[1]:
        raise UserError(f"--feature {args.feature} does not exist: layer {args.layer} has {features.shape[1]} "
                        f"features (0-{features.shape[1] - 1})")
    if not np.any(features[:, args.feature]):
        raise UserError(f"feature {args.feature} of layer {args.layer} is all zeros (dead): nothing to steer along")
    model, tokenizer, _ = _load_model(store, args.model)
    prompt = args.prompt or PAPER_PROMPT
    direction, site = steer_direction(model, args.layer, features[:, args.feature], "hook_post")
    if args.negative:
        direction = -direction
    alpha = args.alpha
    if args.kl is not None:
        hit = alpha_for_kl(model, direction, site, args.layer, prompt_ids(tokenizer, prompt), [args.kl]).targets[0]
        alpha = hit.alpha
        against = " (against it: −v)" if args.negative else ""
        say(f"layer {args.layer} feature {args.feature}{against} at {site}: alpha {hit.alpha:.4g} gives KL {hit.kl:.4g} "
             f"(target {args.kl:g}" + (")" if hit.reached else f", not reached: {hit.note})"))
    else:
        say(f"layer {args.layer} feature {args.feature} at {site}: alpha {alpha:.4g}")
    sample = steered_generate(model, tokenizer, direction, args.layer, site, [alpha], prompt=prompt,
                              n_samples=args.n_samples, max_new_tokens=args.max_new_tokens, seed=args.seed)[0]
    say(f"prompt: {prompt}")
    for i, text in enumerate(sample.texts):
        print(f"[{i}] {text}")
    return 0
