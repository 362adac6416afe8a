# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
r"""
The probabilistic context-free grammar (PCFG) experiment of Le, Kosiorek, Siddharth, Teh & Wood,
"Revisiting Reweighted Wake-Sleep for Models with Stochastic Control Flow" (UAI 2019), sec. 5.2,
written as Pyro programs with the semantics of the paper's reference code (tuananhle7/rrws,
folder ``pcfg/``).

**Model.** A tree :math:`z` is expanded from the start symbol: every non-terminal visited draws
one production, :math:`\mathrm{Categorical}(\mathrm{softmax}\,\theta_A)` (one ``pyro.sample``
per visit, so the number and names of sites depend on earlier draws), terminals end a branch,
and a non-terminal deeper than ``max_depth`` (30) is left unexpanded as a leaf. The sentence
:math:`x` is observed through rrws's approximate-Bayesian-computation likelihood

.. math:: \log p(x | z) = -d(\mathrm{leaves}(z), x)^2,

:math:`d` the Levenshtein distance between word sequences (an unexpanded non-terminal counts as
one out-of-vocabulary word; all such words are equal). It is unnormalized; a fantasy sentence
(the sleep phase) is the leaves themselves, as in rrws.

**Guide.** rrws's ``InferenceNetwork``: a GRU embeds the sentence (one-hot words, zeros for
unknown ones); a GRU cell runs down the tree, its input at each non-terminal the embedding, the
one-hot of the parent's production and the one-hot of the non-terminal (the sample address),
its state the parent's output; an MLP per non-terminal (hidden 50, 25, ReLU) gives the logits.

**Metrics** (rrws's ``util.get_p_error`` and ``util.get_q_error``). Model error: the mean over
non-terminals of :math:`\mathrm{KL}(p_{true}(\cdot|A) \| \mathrm{softmax}\,\theta_A)`. Inference
error: :math:`-\frac1N \sum_n \log q_\phi(z_n | x_n)`, :math:`(z_n, x_n) \sim p_{true}`,
:math:`N = 100` fresh draws, which is :math:`\mathbb{E}_{p(x)} \mathrm{KL}(p(z|x) \| q(z|x))`
plus a constant.

With the same seed the initial parameters equal rrws's (same shapes, created in the same order).

**Without writing a guide** (issue 22): :func:`auto_proposal` builds
:class:`~pyro_rws.AutoAmortizedProposal` for ``PCFG.model``, with :class:`SentenceEmbedding`
(rrws's GRU over one-hot words, per sentence, concatenated in sentence order) as its
``embedding_net`` for the sentences of varying length (``variable_shape=True``, no
standardization of word indices), and :func:`nonterminal_address` as its ``address`` map, so
that every visit of a non-terminal in tree ``i`` shares one proposal head (rrws: one MLP per
non-terminal). :func:`guide_tree_log_prob` scores trees under any guide (hand-written or
automatic) by conditioning it on their productions, and :func:`batch_inference_error` is the
inference error computed with it on batches of sentences, the batches the guide sees in
training (for a guide that proposes each tree from its own sentence, as ``PCFGGuide``, it equals
:func:`inference_error` on the same draws).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample
from torch import nn

from .. import RWS, VIMCO, WakeSleepELBO

#: The astronomers grammar of rrws (``pcfg/pcfgs/astronomers_pcfg.json``), a textbook PCFG.
ASTRONOMERS = {
    "name": "astronomers",
    "terminals": ["astronomers", "ears", "saw", "stars", "telescopes", "with"],
    "non_terminals": ["S", "NP", "VP", "PP", "P", "V"],
    "productions": {
        "S": [["NP", "VP"]],
        "NP": [["NP", "PP"], ["astronomers"], ["ears"], ["saw"], ["stars"], ["telescopes"]],
        "VP": [["V", "NP"], ["VP", "PP"]],
        "PP": [["P", "NP"]],
        "P": [["with"]],
        "V": [["saw"]],
    },
    "start_symbol": "S",
    "production_probs": {
        "S": [1.0],
        "NP": [0.4, 0.1, 0.18, 0.04, 0.18, 0.1],
        "VP": [0.7, 0.3],
        "PP": [1.0],
        "P": [1.0],
        "V": [1.0],
    },
}

Tree = "list | str"  # [symbol, subtree, ...] or a leaf symbol, as in rrws


@dataclass(frozen=True)
class Grammar:
    """A PCFG: words and symbols sorted (rrws indexes them in sorted order)."""

    name: str
    terminals: tuple
    non_terminals: tuple
    productions: dict
    start_symbol: str
    production_probs: dict

    @classmethod
    def from_dict(cls, data: dict) -> Grammar:
        return cls(
            data["name"],
            tuple(sorted(data["terminals"])),
            tuple(sorted(data["non_terminals"])),
            {k: [list(p) for p in v] for k, v in data["productions"].items()},
            data["start_symbol"],
            {k: list(v) for k, v in data["production_probs"].items()},
        )

    @classmethod
    def load(cls, path: str) -> Grammar:
        """A grammar in rrws's JSON format."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def max_productions(self) -> int:
        return max(len(v) for v in self.productions.values())

    def word_index(self, word: str) -> int:
        """Index of a terminal, -1 for anything else (an unexpanded non-terminal)."""
        return self.terminals.index(word) if word in self.terminals else -1

    def sentence(self, words: list[str], device=None) -> torch.Tensor:
        return torch.tensor([self.word_index(w) for w in words], dtype=torch.long, device=device)


def leaves(tree: Tree) -> list[str]:
    if isinstance(tree, list):
        return [w for sub in tree[1:] for w in leaves(sub)]
    return [tree]


def levenshtein(a: list[int], b: list[int]) -> int:
    """Edit distance (insertions, deletions, substitutions of one word) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


class SentenceLikelihood(dist.TorchDistribution):
    """
    rrws's likelihood of a sentence given the leaves of a tree: ``-levenshtein(leaves, x)**2``
    (unnormalized); ``sample()`` returns the leaves. Values are word indices (-1: not a word).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.integer, 1)

    def __init__(self, words: torch.Tensor, dtype: torch.dtype | None = None):
        self.words = words
        self._dtype = dtype or torch.get_default_dtype()
        super().__init__(torch.Size(), words.shape, validate_args=False)

    def sample(self, sample_shape=()) -> torch.Tensor:
        return self.words.expand(torch.Size(sample_shape) + self.words.shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        d = levenshtein(self.words.tolist(), value.tolist())
        return torch.tensor(-float(d * d), dtype=self._dtype, device=self.words.device)

    def expand(self, batch_shape, _instance=None):
        if tuple(batch_shape) != ():
            raise ValueError("SentenceLikelihood is one sentence: it cannot be batched")
        return self


def _expand(grammar, symbol, depth, max_depth, name, step, state) -> Tree:
    """The recursion of model and guide; ``step(name, symbol, state) -> (index, child_state)``."""
    if symbol in grammar.terminals or depth > max_depth:
        return symbol
    index, child_state = step(name, symbol, state)
    production = grammar.productions[symbol][index]
    return [symbol] + [
        _expand(grammar, s, depth + 1, max_depth, f"{name}/{j}{s}", step, child_state)
        for j, s in enumerate(production)
    ]


def sample_choice(name: str, logits: torch.Tensor) -> int:
    """The ``pyro.sample`` of one production (a host read: the control flow depends on it)."""
    return int(pyro.sample(name, dist.Categorical(logits=logits)))


def choices(tree: Tree, name: str, grammar: Grammar, out: dict | None = None) -> dict:
    """``{site name: production index}`` of a tree, under the names model and guide use."""
    out = {} if out is None else out
    if isinstance(tree, list):
        production = [sub[0] if isinstance(sub, list) else sub for sub in tree[1:]]
        out[name] = grammar.productions[tree[0]].index(production)
        for j, sub in enumerate(tree[1:]):
            choices(sub, f"{name}/{j}{production[j]}", grammar, out)
    return out


class _Scorer:
    """A ``choose`` that replays a given tree and sums the log-probabilities of its choices."""

    def __init__(self, given: dict):
        self.given, self.log_prob = given, 0.0

    def __call__(self, name: str, logits: torch.Tensor) -> int:
        index = self.given[name]
        self.log_prob = self.log_prob + torch.log_softmax(logits, -1)[index]
        return index


class PCFG(nn.Module):
    """
    The generative model: production logits ``theta`` (``randn`` at init as in rrws, or the log
    of ``probs``), ``model(sentences)`` a Pyro program over a batch of sentences (word-index
    tensors), one tree per sentence in a sequential ``pyro.plate("sentences")``; the tree of
    sentence ``i`` has sites ``"t{i}/S"``, ``"t{i}/S/0NP"``, ... and the sentence site ``"x{i}"``.
    """

    def __init__(self, grammar: Grammar, probs: dict | None = None, max_depth: int = 30):
        super().__init__()
        self.grammar, self.max_depth = grammar, max_depth
        if probs is None:
            logits = {k: torch.randn(len(v)) for k, v in grammar.productions.items()}
        else:
            logits = {k: torch.tensor(probs[k]).log() for k in grammar.productions}
        self.production_logits = nn.ParameterDict({k: nn.Parameter(v) for k, v in logits.items()})

    def expand(self, name: str, choose: Callable = sample_choice) -> Tree:
        return _expand(
            self.grammar,
            self.grammar.start_symbol,
            0,
            self.max_depth,
            f"{name}/{self.grammar.start_symbol}",
            lambda site, symbol, state: (choose(site, self.production_logits[symbol]), None),
            None,
        )

    def model(self, sentences: list[torch.Tensor]) -> list:
        pyro.module("pcfg_model", self)
        dtype = self.production_logits[self.grammar.start_symbol].dtype
        trees = []
        for i in pyro.plate("sentences", len(sentences)):
            tree = self.expand(f"t{i}")
            words = self.grammar.sentence(leaves(tree), sentences[i].device)
            pyro.sample(f"x{i}", SentenceLikelihood(words, dtype), obs=sentences[i])
            trees.append(tree)
        return trees

    @torch.no_grad()
    def sample(self) -> tuple:
        """``(tree, sentence)`` from the model, outside Pyro (data and metrics)."""
        tree = self.expand("t", lambda name, logits: int(torch.multinomial(logits.softmax(-1), 1)))
        return tree, self.grammar.sentence(leaves(tree))

    def tree_log_prob(self, tree: Tree) -> torch.Tensor:
        scorer = _Scorer(choices(tree, f"t/{self.grammar.start_symbol}", self.grammar))
        self.expand("t", scorer)
        return torch.as_tensor(scorer.log_prob)

    @torch.no_grad()
    def production_probs(self) -> dict:
        return {k: v.softmax(-1) for k, v in self.production_logits.items()}


def embed_sentence(gru: nn.GRU, sentence: torch.Tensor, num_words: int) -> torch.Tensor:
    """rrws's sentence embedding: the last output of ``gru`` over the one-hot words (zeros for
    an unknown word, index < 0)."""
    like = gru.weight_ih_l0
    words = torch.nn.functional.one_hot(sentence.clamp(min=0), num_words)
    words = words.to(like.dtype) * (sentence >= 0).unsqueeze(-1).to(like.dtype)
    output, _ = gru(words.unsqueeze(1))
    return output[-1, 0]


class PCFGGuide(nn.Module):
    """
    rrws's ``InferenceNetwork`` as a Pyro guide; ``guide(sentences, observations=None)`` draws a
    tree per sentence at the model's site names (``observations``: the sleep phase's fantasies).
    """

    def __init__(
        self, grammar: Grammar, obs_dim: int = 100, hidden_dim: int = 100, max_depth: int = 30
    ):
        super().__init__()
        self.grammar, self.max_depth, self.hidden_dim = grammar, max_depth, hidden_dim
        num_words, num_symbols = len(grammar.terminals), len(grammar.non_terminals)
        self.sentence_embedder = nn.GRU(input_size=num_words, hidden_size=obs_dim, num_layers=1)
        self.cell = nn.GRUCell(obs_dim + grammar.max_productions + num_symbols, hidden_dim)
        self.proposal_layers = nn.ModuleDict(
            {
                k: nn.Sequential(
                    nn.Linear(hidden_dim, 50),
                    nn.ReLU(),
                    nn.Linear(50, 25),
                    nn.ReLU(),
                    nn.Linear(25, len(v)),
                )
                for k, v in grammar.productions.items()
            }
        )

    @staticmethod
    def _one_hot(index: int, size: int, like: torch.Tensor) -> torch.Tensor:
        out = like.new_zeros(size)
        out[index] = 1.0
        return out

    def embed(self, sentence: torch.Tensor) -> torch.Tensor:
        return embed_sentence(self.sentence_embedder, sentence, len(self.grammar.terminals))

    def expand(self, name: str, sentence: torch.Tensor, choose: Callable = sample_choice) -> Tree:
        embedding = self.embed(sentence)
        symbols = self.grammar.non_terminals
        num_productions = self.grammar.max_productions

        def step(site, symbol, state):
            previous, hidden = state
            address = self._one_hot(symbols.index(symbol), len(symbols), embedding)
            inputs = torch.cat([embedding, previous, address]).unsqueeze(0)
            output = self.cell(inputs, hidden.unsqueeze(0)).squeeze(0)
            index = choose(site, self.proposal_layers[symbol](output))
            return index, (self._one_hot(index, num_productions, embedding), output)

        start = (embedding.new_zeros(num_productions), embedding.new_zeros(self.hidden_dim))
        g = self.grammar
        return _expand(
            g, g.start_symbol, 0, self.max_depth, f"{name}/{g.start_symbol}", step, start
        )

    def guide(self, sentences: list[torch.Tensor], observations: dict | None = None) -> list:
        pyro.module("pcfg_guide", self)
        trees = []
        for i in pyro.plate("sentences", len(sentences)):
            sentence = sentences[i] if observations is None else observations[f"x{i}"]
            trees.append(self.expand(f"t{i}", sentence))
        return trees

    def tree_log_prob(self, tree: Tree, sentence: torch.Tensor) -> torch.Tensor:
        """``log q(tree | sentence)``, with graph."""
        scorer = _Scorer(choices(tree, f"t/{self.grammar.start_symbol}", self.grammar))
        self.expand("t", sentence, scorer)
        return torch.as_tensor(scorer.log_prob)


# --------------------------------------------------------------------------------------------
# The automatic proposal on the PCFG (issue 22)
# --------------------------------------------------------------------------------------------
class SentenceEmbedding(nn.Module):
    """
    The ``embedding_net`` of :func:`auto_proposal`: rrws's sentence embedding (a GRU over one-hot
    words, zeros for an unknown word, its last output) of each sentence, concatenated in the
    order of the sentence index: ``{"x0": words, "x1": words, ...}`` (or one tensor) of word
    indices of any length to ``(num_sentences * obs_dim,)``.
    """

    def __init__(self, grammar: Grammar, obs_dim: int = 100):
        super().__init__()
        self.num_words = len(grammar.terminals)
        self.gru = nn.GRU(input_size=self.num_words, hidden_size=obs_dim, num_layers=1)

    def embed(self, sentence: torch.Tensor) -> torch.Tensor:
        if sentence.shape[0] == 0:  # an empty sentence: the GRU's initial state
            return self.gru.weight_ih_l0.new_zeros(self.gru.hidden_size)
        return embed_sentence(self.gru, sentence.long(), self.num_words)

    def forward(self, sentences) -> torch.Tensor:
        if torch.is_tensor(sentences):
            return self.embed(sentences)
        order = sorted(sentences, key=lambda name: int(name[1:]))
        return torch.cat([self.embed(sentences[name]) for name in order])


def nonterminal_address(name: str) -> str:
    """``"t{i}/S/0NP/1PP"`` -> ``"t{i}/PP"``: one address per tree and non-terminal."""
    tree, _, path = name.partition("/")
    return f"{tree}/{path.rsplit('/', 1)[-1].lstrip('0123456789')}"


def auto_proposal(model: PCFG, obs_dim: int = 100, **kwargs):
    """
    :class:`~pyro_rws.AutoAmortizedProposal` of ``model.model`` with :class:`SentenceEmbedding`,
    ``variable_shape=True`` and the address map :func:`nonterminal_address` (keyword arguments
    go to the guide: ``hidden_dim``, ``address``, ...).
    """
    from ..autoguides.proposal import AutoAmortizedProposal

    options = {
        "embedding_net": SentenceEmbedding(model.grammar, obs_dim),
        "variable_shape": True,
        "address": nonterminal_address,
        "observations_from": lambda sentences: {f"x{i}": s for i, s in enumerate(sentences)},
    }
    return AutoAmortizedProposal(model.model, **(options | kwargs))


def guide_tree_log_prob(
    guide: Callable, grammar: Grammar, trees: list, sentences: list[torch.Tensor]
) -> torch.Tensor:
    """
    ``log q(trees | sentences)`` of a Pyro guide called as ``guide(sentences)`` with sites at the
    model's names: the guide run under ``poutine.condition`` on the trees' productions
    (:func:`choices`), the log-probabilities of its sample sites summed. Raises a ValueError if
    the guide's sites are not exactly the trees' choices.
    """
    given = {}
    for i, tree in enumerate(trees):
        for name, index in choices(tree, f"t{i}/{grammar.start_symbol}", grammar).items():
            given[name] = torch.tensor(index)
    trace = poutine.trace(poutine.condition(guide, data=given)).get_trace(sentences)
    sites = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }
    if set(sites) != set(given):
        raise ValueError(
            f"the guide's sample sites {sorted(set(sites) ^ set(given))} differ from the trees' "
            "choices: it does not follow the model's control flow"
        )
    return sum(site["fn"].log_prob(site["value"]).sum() for site in sites.values())


@torch.no_grad()
def batch_inference_error(
    guide: Callable, true_model: PCFG, data: list | int = 100, batch_size: int = 2
) -> float:
    """
    ``-(1/N) sum_n log q(z_n | x_n)`` as :func:`inference_error`, with ``q`` scored by
    :func:`guide_tree_log_prob` on batches of ``batch_size`` draws; ``data``: the draws
    ``[(tree, sentence), ...]`` (fixed, to compare guides on the same ones) or their number.
    """
    if isinstance(data, int):
        data = [true_model.sample() for _ in range(data)]
    total = 0.0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        trees, sentences = [t for t, _ in batch], [s for _, s in batch]
        total += float(guide_tree_log_prob(guide, true_model.grammar, trees, sentences))
    return -total / len(data)


# --------------------------------------------------------------------------------------------
# Metrics (rrws's util.get_p_error and util.get_q_error) and training
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def model_error(model: PCFG, true_model: PCFG) -> float:
    """Mean over non-terminals of ``KL(true production probabilities || learned)``."""
    p, q = true_model.production_probs(), model.production_probs()
    kls = [(p[a] * (p[a].log() - q[a].log())).sum() for a in model.grammar.non_terminals]
    return float(sum(kls) / len(kls))


@torch.no_grad()
def inference_error(guide: PCFGGuide, true_model: PCFG, num_samples: int = 100) -> float:
    """``-(1/N) sum_n log q(z_n | x_n)`` on ``N`` fresh ``(z_n, x_n) ~ true_model``."""
    total = 0.0
    for _ in range(num_samples):
        tree, sentence = true_model.sample()
        total += float(guide.tree_log_prob(tree, sentence))
    return -total / num_samples


#: one run of model and guide per particle (stochastic control flow), no vectorized plates
_SEQUENTIAL = {"vectorize_particles": False, "max_plate_nesting": 0}
#: name -> (loss for K, rrws's train mode or None). "ws-le" is the WS of Le et al. (rrws "ws":
#: importance-weighted wake-theta, sleep-phi on batch x K fantasies); "ws" the classic one.
ESTIMATORS: dict[str, tuple[Callable[[int], object], str | None]] = {
    "rws": (lambda k: RWS(k, insomnia=1.0, **_SEQUENTIAL), "ww"),
    "ws-le": (lambda k: RWS(k, insomnia=0.0, num_sleep_particles=k, **_SEQUENTIAL), "ws"),
    "ws": (lambda k: WakeSleepELBO(k, num_sleep_particles=k, **_SEQUENTIAL), None),
    "vimco": (lambda k: VIMCO(k, **_SEQUENTIAL), "vimco"),
    "reinforce": (lambda k: VIMCO(k, baseline=None, **_SEQUENTIAL), "reinforce"),
}


@dataclass
class Result:
    """Curves of one run: errors at ``iterations``, and ms per training iteration."""

    estimator: str
    num_particles: int
    seed: int
    iterations: list
    model_error: list
    inference_error: list
    ms_per_iteration: float
    model: PCFG
    guide: PCFGGuide


def train(
    estimator: str = "rws",
    num_particles: int = 5,
    num_iterations: int = 2000,
    *,
    batch_size: int = 2,
    seed: int = 1,
    eval_every: int = 10,
    eval_samples: int = 100,
    lr: float = 1e-3,
    grammar: Grammar | None = None,
    progress: Callable | None = None,
) -> Result:
    """
    rrws's training loop with a pyro_rws loss: per iteration ``batch_size`` fresh sentences from
    the true grammar, one ``loss_and_grads`` and one ``torch.optim.Adam`` step on model and guide
    parameters (rrws: Adam with default settings). The seed fixes the initial parameters (equal
    to rrws's for the same seed) and every draw. pyro_rws sums the per-sentence terms where rrws
    averages them: Adam does not see a constant factor.

    :param str estimator: a key of :data:`ESTIMATORS`.
    :param progress: called as ``progress(iteration)`` after each iteration.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
    grammar = grammar or Grammar.from_dict(ASTRONOMERS)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, guide = PCFG(grammar), PCFGGuide(grammar)
    true_model = PCFG(grammar, probs=grammar.production_probs)
    loss = ESTIMATORS[estimator][0](num_particles)
    optimizer = torch.optim.Adam([*model.parameters(), *guide.parameters()], lr=lr)
    curves: dict[str, list] = {"iterations": [], "model_error": [], "inference_error": []}
    elapsed = 0.0

    def record(iteration):
        curves["iterations"].append(iteration)
        curves["model_error"].append(model_error(model, true_model))
        curves["inference_error"].append(inference_error(guide, true_model, eval_samples))

    for iteration in range(num_iterations):
        sentences = [true_model.sample()[1] for _ in range(batch_size)]
        start = time.perf_counter()
        optimizer.zero_grad()
        loss.loss_and_grads(model.model, guide.guide, sentences)
        optimizer.step()
        elapsed += time.perf_counter() - start
        if iteration % eval_every == 0:
            record(iteration)
        if progress is not None:
            progress(iteration)
    if (num_iterations - 1) % eval_every:
        record(num_iterations - 1)
    ms = 1000 * elapsed / max(num_iterations, 1)
    return Result(
        estimator, num_particles, seed, ms_per_iteration=ms, model=model, guide=guide, **curves
    )
