"""The offline demo: a tiny GPT-2 with planted concept features, and a labelled corpus for it.

``jsnmf run`` with no ``--model`` builds this model (deterministically, in well under a second),
extracts its MLP activations on the shipped corpus, fits SNMF and checks that every planted concept
comes back as a feature. It needs no network and no downloaded weights, and it goes through the same
loader as a real checkpoint: the model is written in Hugging Face format (``config.json``,
``model.safetensors`` with GPT-2's tensor names, ``tokenizer.json`` with a word-level tokenizer).

How the concepts are planted (``d_model`` = 64, ``d_mlp`` = 256, 2 layers):

- Each concept ``c`` owns a unit direction ``d_c`` in the residual stream (orthonormal, and
  orthogonal to the all-ones vector so LayerNorm's centring leaves it alone).
- A word's embedding is Gaussian noise kept out of the concept subspace, plus, for a word of
  concept ``c``, ``α_w·d_c`` (``α_w`` varies a little per word).
- Attention weights are tiny, so the residual stream at every layer is about the token's embedding
  (plus a small MLP write-back, plus a small position embedding).
- In every layer a group of ``group_size`` neurons per concept reads ``d_c`` (``c_fc`` column
  = ``d_c`` + a little noise) with a negative bias set between the concept words' and the other
  words' pre-activations, so the group fires together on that concept's words and on nothing else.
  Their ``c_proj`` rows write ``d_c`` back, so a concept feature's vocabulary projection puts the
  concept's words on top. The remaining neurons are random.

The corpus (``jsnmf/data/demo_corpus.jsonl``) is a few hundred template sentences, each labelled with
the concept(s) whose words it holds (``"filler"`` for none); ``_compose_corpus`` regenerates it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "CONCEPTS", "DemoSpec", "DEMO_LAYERS", "DEMO_RANK", "DEMO_SPARSITY", "DEMO_MAX_ITER", "DEMO_INIT",
    "demo_corpus_path", "build_demo_model", "read_planted", "recovery_from_codes",
]

# The planted concepts: name -> words (every word a single token of the demo tokenizer).
CONCEPTS: dict[str, tuple[str, ...]] = {
    "weekdays": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "months": ("january", "february", "march", "april", "may", "june", "july", "august",
               "september", "october", "november", "december"),
    "colours": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "grey", "black", "white"),
    "numbers": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "animals": ("dog", "cat", "horse", "rabbit", "fox", "tiger", "lion", "sheep", "goat", "owl", "wolf", "deer"),
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "peach", "plum", "melon", "orange"),
    "body_parts": ("knee", "elbow", "shoulder", "finger", "nose", "ear", "ankle", "wrist", "neck", "thumb"),
    "countries": ("france", "spain", "italy", "germany", "japan", "brazil", "canada", "egypt", "kenya",
                  "norway", "peru", "india"),
    "instruments": ("piano", "violin", "guitar", "drum", "flute", "trumpet", "cello", "harp"),
    "vehicles": ("car", "bus", "train", "bicycle", "truck", "boat", "tram", "ferry", "taxi", "scooter"),
}

# The settings `jsnmf run` uses for the demo; they recover every planted concept.
DEMO_LAYERS = (0, 1)
DEMO_RANK = 16
DEMO_SPARSITY = 0.03  # ceil(0.03 * 256) = 8 neurons per feature, the size of a planted group
DEMO_MAX_ITER = 300
DEMO_INIT = "svd"  # random starts sometimes merge two concepts into one feature; SVD starts do not

SPECIAL_TOKENS = ("<|endoftext|>", "[UNK]")
PLANTED_FILE = "planted.json"
CORPUS_FILE = "demo_corpus.jsonl"


@dataclass(frozen=True)
class DemoSpec:
    """Sizes and seed of the demo model."""

    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_mlp: int = 256
    group_size: int = 8
    n_positions: int = 128
    seed: int = 0


# ---------------------------------------------------------------- corpus


def demo_corpus_path() -> Path:
    """Path of the shipped demo corpus (JSONL, fields ``text`` and ``label``)."""
    return Path(str(resources.files("jsnmf") / "data" / CORPUS_FILE))


_TEMPLATES: dict[str, tuple[str, ...]] = {
    "weekdays": (
        "The market opens early on {} morning.", "We will meet again next {} after lunch.",
        "My sister always calls me on {} evening.", "The museum is closed every {}.",
        "Her flight leaves on {} at noon.", "On {} the office was quiet.",
        "The report is due by {} at the latest.", "They played football last {} in the park.",
    ),
    "months": (
        "The garden looks lovely in {}.", "School starts again in {}.",
        "My grandmother was born in {}.", "The lake was frozen in late {}.",
        "We moved into the new house in {}.", "The festival takes place every {}.",
        "Prices went up sharply in {}.", "In {} the town feels busy.",
    ),
    "colours": (
        "She painted the front door {}.", "He wore a {} coat to the party.",
        "The house next to the bakery is {}.", "They chose {} curtains for the kitchen.",
        "My favourite shirt is {}.", "A {} balloon floated over the roof.",
        "The walls of the room are {}.", "The little girl drew a {} house.",
    ),
    "numbers": (
        "We bought {} tickets for the show.", "The recipe needs {} eggs.",
        "There were {} people waiting at the door.", "She has read {} books this year.",
        "The show started {} minutes late.", "He counted {} birds on the fence.",
        "Our team scored {} goals in the final.", "We stayed for {} nights by the sea.",
    ),
    "animals": (
        "A {} was sleeping under the tree.", "The children fed the {} at the farm.",
        "We saw a {} near the river.", "My neighbour has a very old {}.",
        "The {} ran across the field.", "There is a picture of a {} on the wall.",
        "The zoo has a new {} this spring.", "A {} followed us home last night.",
    ),
    "fruits": (
        "She ate a {} for breakfast.", "The shop sells fresh {} juice.",
        "He cut the {} into small pieces.", "There is a {} in my bag.",
        "We made a {} cake for the party.", "The {} on the table is ripe.",
        "My brother does not like {} at all.", "A slice of {} sat on the plate.",
    ),
    "body_parts": (
        "He hurt his {} playing tennis.", "She broke her {} last winter.",
        "My {} is still sore after the walk.", "The doctor looked at his {}.",
        "The ball hit her {} hard.", "He put a bandage on his {}.",
        "She felt a sharp pain in her {}.", "The cold wind made my {} ache.",
    ),
    "countries": (
        "They spent the summer in {}.", "My cousin works in {} now.",
        "This coffee comes from {}.", "We flew to {} last year.",
        "She is reading about the history of {}.", "The team from {} won the match.",
        "He sent a letter to a friend in {}.", "The film was made in {}.",
    ),
    "instruments": (
        "She practises the {} every day.", "He played the {} at the concert.",
        "My uncle sold his old {}.", "The {} sounded beautiful in the hall.",
        "They bought a {} for the school.", "The music teacher tuned the {}.",
        "I learned to play the {} as a child.", "A dusty {} was standing in the corner.",
    ),
    "vehicles": (
        "We took the {} to the city.", "The {} was late again this morning.",
        "He parked the {} near the station.", "The {} broke down on the bridge.",
        "She rides the {} to work.", "The {} stopped at the corner.",
        "They waited for the {} in the rain.", "The old {} was cleaned last spring.",
    ),
}

# Two concepts in one sentence: (template, concept of the first slot, concept of the second slot).
_MIXED_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("On {} we saw a {} near the river.", "weekdays", "animals"),
    ("In {} they travelled to {}.", "months", "countries"),
    ("The {} gate had {} locks.", "colours", "numbers"),
    ("She bought a {} and a {} at the market.", "fruits", "fruits"),
    ("He played the {} until his {} hurt.", "instruments", "body_parts"),
    ("We took the {} to see the {}.", "vehicles", "animals"),
    ("Every {} she eats a {}.", "weekdays", "fruits"),
    ("The {} from {} arrived in {}.", "vehicles", "countries", "months"),
    ("My {} is painted {}.", "vehicles", "colours"),
    ("In {} the farmer bought {} chairs.", "months", "numbers"),
)

_FILLER = (
    "The weather was nice and we walked home slowly.",
    "He opened the window and listened to the street.",
    "Nobody knew where the keys had gone.",
    "She wrote a long letter to her old teacher.",
    "The meeting ended without a clear decision.",
    "We should leave before it gets dark.",
    "The book on the shelf belongs to my friend.",
    "It was a quiet evening in the small village.",
    "They laughed at the joke for a long time.",
    "The new library is bigger than the old one.",
    "I think the answer is hidden in the last chapter.",
    "The kitchen smelled of fresh bread.",
    "He forgot to bring his umbrella again.",
    "The children were playing in the garden.",
    "Our neighbours are moving to another town.",
    "The path through the forest was narrow.",
    "She smiled and closed the door behind her.",
    "The teacher asked a difficult question.",
    "We found an old map in the attic.",
    "The river was calm after the storm.",
    "Please put the cups back in the cupboard.",
    "The phone rang twice and then stopped.",
    "He likes to read the news in the morning.",
    "The shop on the corner sells good bread.",
    "They talked about the film for hours.",
    "It took a while to find the right house.",
    "The lamp in the hall is broken.",
    "She keeps her notes in a small box.",
    "The road to the village was covered in leaves.",
    "We waited at the station for a long time.",
)

_SINGLE_PER_TEMPLATE = 4  # sentences per single-concept template
_MIXED_PER_TEMPLATE = 5


def _word_cycles(rng: random.Random) -> dict[str, itertools.cycle]:
    """Per concept an endless cycle over its words in a shuffled order, so words appear evenly."""
    cycles = {}
    for name, words in CONCEPTS.items():
        order = list(words)
        rng.shuffle(order)
        cycles[name] = itertools.cycle(order)
    return cycles


def _compose_corpus(seed: int = 0) -> list[dict]:
    """The demo corpus as records ``{"text", "label"}``; the shipped file is this, written as JSONL."""
    rng = random.Random(seed)
    words = _word_cycles(rng)
    records = []
    for name, templates in _TEMPLATES.items():
        for template in templates:
            for _ in range(_SINGLE_PER_TEMPLATE):
                records.append({"text": _fill(template, [_display(name, next(words[name]))]), "label": name})
    for template, *slots in _MIXED_TEMPLATES:
        for _ in range(_MIXED_PER_TEMPLATE):
            text = _fill(template, [_display(c, next(words[c])) for c in slots])
            records.append({"text": text, "label": "+".join(sorted(set(slots)))})
    records.extend({"text": text, "label": "filler"} for text in _FILLER)
    rng.shuffle(records)
    return records


_PROPER_NOUNS = ("weekdays", "months", "countries")


def _display(concept: str, word: str) -> str:
    """How a concept word is written in a sentence (the tokenizer lower-cases it again)."""
    return word.capitalize() if concept in _PROPER_NOUNS else word


def _fill(template: str, words: list[str]) -> str:
    text = template.format(*words)
    return text[0].upper() + text[1:]


def read_demo_corpus() -> list[dict]:
    """The shipped demo corpus records."""
    with open(demo_corpus_path(), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- tokenizer


def _corpus_vocabulary(records: list[dict]) -> list[str]:
    """Every word (lower-cased, punctuation split off) of the corpus and the concepts, sorted."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = {w for ws in CONCEPTS.values() for w in ws}
    for record in records:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(record["text"])))
    return sorted(words)


def _build_tokenizer(vocabulary: list[str], spec: DemoSpec):
    """A word-level fast tokenizer: lower-cases, splits on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + vocabulary)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    eos = SPECIAL_TOKENS[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, unk_token="[UNK]", pad_token=eos,
        model_max_length=spec.n_positions,
    )


# ---------------------------------------------------------------- weights


def _gelu_new(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _concept_directions(rng: np.random.Generator, n_concepts: int, d_model: int) -> np.ndarray:
    """(n_concepts, d_model) orthonormal rows, each orthogonal to the all-ones vector."""
    basis = np.concatenate([np.ones((d_model, 1)), rng.standard_normal((d_model, n_concepts))], axis=1)
    q, _ = np.linalg.qr(basis)
    return q[:, 1:].T


def _embeddings(rng, vocab: list[str], directions: np.ndarray, d_model: int) -> np.ndarray:
    """Noise outside the concept subspace, plus α_w·d_c for the words of concept c."""
    noise = rng.standard_normal((len(vocab), d_model))
    noise -= (noise @ directions.T) @ directions
    concept_of = {w: c for c, words in enumerate(CONCEPTS.values()) for w in words}
    for i, word in enumerate(vocab):
        if word in concept_of:
            noise[i] += rng.uniform(5.0, 7.0) * directions[concept_of[word]]
    return noise.astype(np.float32)


def _mlp_weights(rng, spec: DemoSpec, directions: np.ndarray, residual: np.ndarray,
                 concept_rows: list[np.ndarray]):
    """One layer's ``c_fc`` (d_model, d_mlp), bias, ``c_proj`` (d_mlp, d_model) and planted groups.

    ``residual`` holds the residual stream of every vocabulary word entering this layer; biases of
    the planted neurons are set between the concept words' and the other words' pre-activations.
    """
    d, m = spec.d_model, spec.d_mlp
    w_fc = rng.standard_normal((d, m)) / np.sqrt(d)  # random neurons: pre-activation std ≈ 1
    b_fc = rng.normal(-1.5, 0.3, m)
    w_proj = rng.standard_normal((m, d)) * 0.02
    normed = _layer_norm(residual)
    neurons = rng.permutation(m)  # a different neuron layout in every layer
    groups = {}
    for c, name in enumerate(CONCEPTS):
        group = np.sort(neurons[c * spec.group_size:(c + 1) * spec.group_size])
        groups[name] = [int(n) for n in group]
        inside = np.zeros(len(residual), bool)
        inside[concept_rows[c]] = True
        for n in group:
            column = directions[c] + 0.15 * rng.standard_normal(d) / np.sqrt(d)
            pre = normed @ column
            threshold = 0.5 * (pre[inside].min() + pre[~inside].max())
            gain = 1.5 * rng.uniform(0.8, 1.2)
            w_fc[:, n] = gain * column
            b_fc[n] = -gain * threshold
            w_proj[n] = 0.05 * directions[c]
    return w_fc, b_fc, w_proj, groups


def _build_weights(spec: DemoSpec, vocab: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """All GPT-2 tensors (checkpoint names, Conv1D [in, out] layout) and the planted neuron groups."""
    rng = np.random.default_rng(spec.seed)
    d, m = spec.d_model, spec.d_mlp
    directions = _concept_directions(rng, len(CONCEPTS), d)
    wte = _embeddings(rng, vocab, directions, d)
    wpe = (rng.standard_normal((spec.n_positions, d)) * 0.02).astype(np.float32)
    index = {w: i for i, w in enumerate(vocab)}
    concept_rows = [np.array([index[w] for w in words]) for words in CONCEPTS.values()]
    tensors = {"wte.weight": wte, "wpe.weight": wpe}
    residual = wte.astype(np.float64)  # position and attention contributions are negligible
    planted = {}
    for i in range(spec.n_layer):
        p = f"h.{i}."
        tensors[p + "ln_1.weight"] = np.ones(d)
        tensors[p + "ln_1.bias"] = np.zeros(d)
        tensors[p + "attn.c_attn.weight"] = rng.standard_normal((d, 3 * d)) * 1e-3
        tensors[p + "attn.c_attn.bias"] = np.zeros(3 * d)
        tensors[p + "attn.c_proj.weight"] = rng.standard_normal((d, d)) * 1e-3
        tensors[p + "attn.c_proj.bias"] = np.zeros(d)
        tensors[p + "ln_2.weight"] = np.ones(d)
        tensors[p + "ln_2.bias"] = np.zeros(d)
        w_fc, b_fc, w_proj, groups = _mlp_weights(rng, spec, directions, residual, concept_rows)
        tensors[p + "mlp.c_fc.weight"], tensors[p + "mlp.c_fc.bias"] = w_fc, b_fc
        tensors[p + "mlp.c_proj.weight"], tensors[p + "mlp.c_proj.bias"] = w_proj, np.zeros(d)
        planted[str(i)] = groups
        residual = residual + _gelu_new(_layer_norm(residual) @ w_fc + b_fc) @ w_proj
    tensors["ln_f.weight"] = np.ones(d)
    tensors["ln_f.bias"] = np.zeros(d)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, planted


def _config(spec: DemoSpec, vocab_size: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": spec.n_positions,
        "n_embd": spec.d_model,
        "n_layer": spec.n_layer,
        "n_head": spec.n_head,
        "n_inner": spec.d_mlp,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }


def build_demo_model(out_dir: str | os.PathLike, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo checkpoint (Hugging Face GPT-2 format) to ``out_dir`` and return its path.

    Files: ``config.json``, ``model.safetensors``, ``tokenizer.json`` (+ tokenizer config files),
    ``planted.json`` (which neurons of which layer carry which concept). Deterministic for a given
    ``spec``; an existing demo checkpoint at ``out_dir`` built from the same spec is reused. The
    directory is assembled under a temporary name and moved into place, so a kill leaves no half model.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).expanduser().resolve()
    if _is_built(out_dir, spec):
        return out_dir
    if out_dir.exists() and not (out_dir / PLANTED_FILE).is_file():
        if any(out_dir.iterdir()):
            raise ValueError(f"{out_dir}: exists and is not a jsnmf demo model; choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIAL_TOKENS) + _corpus_vocabulary(read_demo_corpus())
    tensors, planted = _build_weights(spec, vocab)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_config(spec, len(vocab)), indent=2) + "\n")
        _build_tokenizer(vocab[len(SPECIAL_TOKENS):], spec).save_pretrained(str(tmp))
        record = {"spec": asdict(spec), "corpus_sha256": _corpus_sha256(),
                  "concepts": {k: list(v) for k, v in CONCEPTS.items()}, "layers": planted}
        (tmp / PLANTED_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if out_dir.exists():
            _replace_demo_files(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _replace_demo_files(new: Path, out_dir: Path) -> None:
    """Move the freshly built files over the old demo's, touching nothing else in ``out_dir`` (a user's
    files there survive a rebuild). The marker ``planted.json`` goes first and comes back last, so a
    kill in between leaves a folder that is not taken for a built demo and is rebuilt next time."""
    (out_dir / PLANTED_FILE).unlink(missing_ok=True)
    for path in sorted(new.iterdir(), key=lambda p: p.name == PLANTED_FILE):
        os.replace(path, out_dir / path.name)


def _is_built(out_dir: Path, spec: DemoSpec) -> bool:
    try:
        record = json.loads((out_dir / PLANTED_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json")
    same = record.get("spec") == asdict(spec) and record.get("corpus_sha256") == _corpus_sha256()
    return same and all((out_dir / f).is_file() for f in files)


def _corpus_sha256() -> str:
    """The shipped corpus fixes the vocabulary, so a model built from another corpus is not reused."""
    return hashlib.sha256(demo_corpus_path().read_bytes()).hexdigest()


def read_planted(model_dir: str | os.PathLike) -> dict:
    """The ``planted.json`` of a demo checkpoint: spec, concepts, and per layer concept -> neurons."""
    path = Path(model_dir) / PLANTED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a jsnmf demo model (no {PLANTED_FILE})")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- recovery


def recovery_from_codes(codes: np.ndarray, token_ids: np.ndarray, decode, k_top: int = 25,
                        concepts: dict[str, tuple[str, ...]] = CONCEPTS) -> dict:
    """``analysis.concept_recovery`` of the features whose codes are ``codes`` (n_tokens, k)."""
    from jsnmf.analysis import concept_recovery, top_activations

    token_ids = np.asarray(token_ids)
    top_tokens = [[decode([int(t)]) for t in token_ids[idx]] for idx in top_activations(codes, k_top)]
    return concept_recovery(top_tokens, concepts)
