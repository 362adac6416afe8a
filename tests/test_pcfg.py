# Copyright Contributors to the pyro_rws project.
# SPDX-License-Identifier: Apache-2.0
"""The PCFG example (pyro_rws/examples/pcfg.py): rrws's semantics on a tiny grammar, by hand."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

import pyro_rws
from pyro_rws import RWS, cli
from pyro_rws.examples import pcfg

pytestmark = pytest.mark.usefixtures("float64")

# S -> a | S b, truncated below depth 1: the trees are (S a), (S (S a) b) and (S (S S b) b)
TINY = {
    "name": "tiny",
    "terminals": ["b", "a"],
    "non_terminals": ["S"],
    "productions": {"S": [["a"], ["S", "b"]]},
    "start_symbol": "S",
    "production_probs": {"S": [0.7, 0.3]},
}
A, B, UNK = 0, 1, -1  # sorted terminals: a, b; an unexpanded non-terminal is -1


def num(t) -> float:
    return float(torch.as_tensor(t).detach())


def tiny(max_depth=1):
    grammar = pcfg.Grammar.from_dict(TINY)
    return (
        grammar,
        pcfg.PCFG(grammar, max_depth=max_depth),
        pcfg.PCFGGuide(grammar, 8, 8, max_depth),
    )


@pytest.mark.parametrize(
    "a, b, d",
    [
        ([], [], 0),
        ([0], [], 1),
        ([0, 1], [1, 0], 2),
        ([0, 1, 2], [0, 2], 1),
        ([-1, 1, 1], [0, 1], 2),
    ],
)
def test_levenshtein(a, b, d):
    assert pcfg.levenshtein(a, b) == d == pcfg.levenshtein(b, a)


def test_grammar_sorted_like_rrws():
    g = pcfg.Grammar.from_dict(pcfg.ASTRONOMERS)
    assert g.terminals == ("astronomers", "ears", "saw", "stars", "telescopes", "with")
    assert g.non_terminals == ("NP", "P", "PP", "S", "V", "VP")
    assert g.sentence(["saw", "NP", "with"]).tolist() == [2, -1, 5]
    assert g.max_productions == 6


@pytest.mark.parametrize(
    "choices, words",
    [
        ({"t0/S": 0}, [A]),
        ({"t0/S": 1, "t0/S/0S": 0}, [A, B]),
        ({"t0/S": 1, "t0/S/0S": 1}, [UNK, B, B]),
    ],
)
def test_model_log_joint_by_hand(choices, words):
    """log p(z) + log p(x|z) = sum of log softmax(theta) over visits - levenshtein(leaves, x)^2."""
    grammar, model, _ = tiny()
    x = torch.tensor([A, B])
    data = {name: torch.tensor(i) for name, i in choices.items()}
    trace = poutine.trace(poutine.condition(model.model, data=data)).get_trace([x])
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n.startswith("t")]
    assert sites == list(choices)  # one site per non-terminal expanded, none below max_depth
    log_theta = torch.log_softmax(model.production_logits["S"].detach(), -1)
    expected = sum(log_theta[i] for i in choices.values()) - pcfg.levenshtein(words, [A, B]) ** 2
    assert num(trace.log_prob_sum()) == pytest.approx(float(expected), abs=1e-12)
    # the fantasy of the sleep phase is the leaves themselves
    fantasy = poutine.trace(poutine.condition(poutine.uncondition(model.model), data=data))
    assert fantasy.get_trace([x]).nodes["x0"]["value"].tolist() == words


def test_guide_matches_its_scorer_and_model_sites():
    grammar, model, guide = tiny(max_depth=3)
    sentences = [torch.tensor([A, B, B]), torch.tensor([A])]
    for _ in range(5):
        guide_trace = poutine.trace(guide.guide).get_trace(sentences)
        trees = guide_trace.nodes["_RETURN"]["value"]
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(
            sentences
        )

        def latent(trace):
            return {n for n, s in trace.nodes.items() if s["type"] == "sample" and n[0] == "t"}

        assert latent(model_trace) == latent(guide_trace) and latent(guide_trace)
        for i, (tree, x) in enumerate(zip(trees, sentences, strict=True)):
            log_q = sum(
                s["fn"].log_prob(s["value"])
                for n, s in guide_trace.nodes.items()
                if s["type"] == "sample" and n.startswith(f"t{i}/")
            )
            assert num(guide.tree_log_prob(tree, x)) == pytest.approx(num(log_q), abs=1e-10)
            log_p = (
                model.tree_log_prob(tree)
                - pcfg.levenshtein(grammar.sentence(pcfg.leaves(tree)).tolist(), x.tolist()) ** 2
            )
            log_p_trace = sum(
                s["fn"].log_prob(s["value"])
                for n, s in model_trace.nodes.items()
                if s["type"] == "sample" and (n.startswith(f"t{i}/") or n == f"x{i}")
            )
            assert num(log_p) == pytest.approx(num(log_p_trace), abs=1e-10)


def test_model_error_by_hand():
    grammar, model, _ = tiny()
    true = pcfg.PCFG(grammar, probs={"S": [0.7, 0.3]})
    with torch.no_grad():
        model.production_logits["S"].copy_(torch.tensor([0.5, 0.5]).log())
    kl = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert pcfg.model_error(model, true) == pytest.approx(kl, abs=1e-12)
    g = pcfg.Grammar.from_dict(pcfg.ASTRONOMERS)  # the mean runs over all non-terminals
    truth = pcfg.PCFG(g, probs=g.production_probs)
    assert pcfg.model_error(truth, truth) == pytest.approx(0.0, abs=1e-12)


def test_inference_error_is_minus_mean_log_q_on_true_draws():
    grammar, _, guide = tiny(max_depth=3)
    true = pcfg.PCFG(grammar, probs={"S": [0.7, 0.3]})
    torch.manual_seed(3)
    error = pcfg.inference_error(guide, true, num_samples=20)
    torch.manual_seed(3)
    draws = [true.sample() for _ in range(20)]
    expected = -sum(num(guide.tree_log_prob(z, x)) for z, x in draws) / 20
    assert error == pytest.approx(expected, abs=1e-10)
    # true.sample draws productions with the true probabilities: depth-0 choice frequencies
    torch.manual_seed(0)
    first = [true.sample()[0][1] == "a" for _ in range(2000)]
    assert sum(first) / 2000 == pytest.approx(0.7, abs=4 * math.sqrt(0.21 / 2000))


def test_rws_weights_are_per_sentence():
    """rrws takes the log-sum-exp over particles separately for each sentence of the batch."""
    grammar, model, guide = tiny(max_depth=3)
    loss = RWS(3, vectorize_particles=False, max_plate_nesting=0)
    sentences = [torch.tensor([A, B]), torch.tensor([A]), torch.tensor([A, B, B])]
    value = loss.loss(model.model, guide.guide, sentences)
    assert loss.stats.ess.shape == (3,)
    assert math.isfinite(value)


@pytest.mark.parametrize("estimator", sorted(pcfg.ESTIMATORS))
def test_train_a_few_steps(estimator):
    result = pcfg.train(estimator, 2, 3, eval_every=2, eval_samples=2, seed=0)
    assert result.iterations == [0, 2]
    assert all(math.isfinite(v) for v in result.model_error + result.inference_error)
    pyro.set_rng_seed(0)  # the initial logits of the run
    init = pcfg.PCFG(result.model.grammar)
    moved = any(
        not torch.equal(a, b)
        for a, b in zip(init.parameters(), result.model.parameters(), strict=True)
    )
    assert moved
    with pytest.raises(ValueError, match="unknown estimator"):
        pcfg.train("nvil", 2, 1)


def test_cli_quick(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = [
        "pcfg",
        "--quick",
        "--no-progress",
        "--steps",
        "2",
        "-K",
        "2",
        "--estimators",
        "rws",
        "--eval-samples",
        "2",
        "--eval-every",
        "1",
        "--plot",
        str(tmp_path / "pcfg.png"),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "PCFG (astronomers)" in out and "model error" in out and "inference error" in out
    assert "NP learned" in out
    assert (tmp_path / "pcfg.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["pcfg", "--estimators", "nvil"]) == 2


# The three trees of TINY below depth 1 (the last ends in an unexpanded S)
TINY_TREES = [["S", "a"], ["S", ["S", "a"], "b"], ["S", ["S", "S", "b"], "b"]]


def test_guide_tree_log_prob_is_tree_log_prob_and_batch_inference_error():
    grammar, _, guide = tiny(max_depth=3)
    true = pcfg.PCFG(grammar, probs={"S": [0.7, 0.3]})
    torch.manual_seed(5)
    draws = [true.sample() for _ in range(6)]
    trees, sentences = [t for t, _ in draws[:2]], [x for _, x in draws[:2]]
    with torch.no_grad():
        both = pcfg.guide_tree_log_prob(guide.guide, grammar, trees, sentences)
        each = sum(guide.tree_log_prob(t, x) for t, x in zip(trees, sentences, strict=True))
    assert num(both) == pytest.approx(num(each), abs=1e-12)
    error = pcfg.batch_inference_error(guide.guide, true, draws, batch_size=2)
    expected = -sum(num(guide.tree_log_prob(z, x)) for z, x in draws) / 6
    assert error == pytest.approx(expected, abs=1e-10)
    with pytest.raises(ValueError, match="control flow"):  # a tree the guide does not follow
        pcfg.guide_tree_log_prob(guide.guide, grammar, [trees[0]], sentences)


def test_auto_proposal_on_sentences_of_varying_length():
    """AutoAmortizedProposal with a GRU embedding and one head per tree and non-terminal."""
    grammar, model, _ = tiny(max_depth=1)
    guide = pcfg.auto_proposal(model, obs_dim=8, hidden_dim=8)
    sentences = [torch.tensor([A, B]), torch.tensor([A])]
    # q is one distribution over the 3 x 3 tree pairs, for sentences of several lengths
    for xs in (sentences, [torch.tensor([UNK, B, B]), torch.tensor([A, B])]):
        with torch.no_grad():
            total = sum(
                pcfg.guide_tree_log_prob(guide, grammar, [t0, t1], xs).exp()
                for t0 in TINY_TREES
                for t1 in TINY_TREES
            )
        assert num(total) == pytest.approx(1.0, abs=1e-12)
    assert guide.addresses == ["t0/S", "t1/S"]
    assert pcfg.nonterminal_address("t1/S/0NP/1PP") == "t1/PP"
    # the sleep phase: fantasies of every length reach the embedding, no standardization
    loss = pyro_rws.SleepPhaseLoss(4, vectorize_particles=False, max_plate_nesting=0)
    guide.prepare(sentences, num_simulations=10)  # every address, for torch.optim
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
    before = [p.detach().clone() for p in guide.lstm.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        loss.loss_and_grads(model.model, guide, sentences)
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, guide.lstm.parameters(), strict=True))
    assert len(guide.embedding.standardizers) == 0
