"""Scale-free measures: prompt spread, variation ratio, the trigger bound, ordinary-word steering,
and the step floor below which a search cannot pass."""

from __future__ import annotations

import torch

from amdet_gate.confirm import TokenTrigger, insert_tokens, natural_steering
from amdet_gate.encoders.clip import ClipTextAdapter
from amdet_gate.engine import (
    CleanSpread,
    Models,
    SearchOutcome,
    Thresholds,
    clip_triggers,
    position_spread,
    precompute,
    spread_of_sum,
    trigger_bound,
)
from amdet_gate.prompts import builtin_prompts
from amdet_gate.settings import FAIL, INCONCLUSIVE, PASS
from amdet_gate.sources.local import local_model
from amdet_gate.token_search import Confirmation, Objective, TokenSearchSettings, token_search
from amdet_gate.tokenizer import bundled_tokenizer
from amdet_gate.verdict import decide


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_spread_is_one_minus_mean_pairwise_cosine_and_chunks_add_up() -> None:
    unit = _unit(torch.randn(6, 4, 8))
    cosine = torch.einsum("pld,qld->lpq", unit, unit)
    off_diagonal = (cosine.sum(dim=(1, 2)) - 6) / 30
    torch.testing.assert_close(position_spread(unit), 1 - off_diagonal)
    torch.testing.assert_close(spread_of_sum(unit[:2].sum(0) + unit[2:].sum(0), 6), position_spread(unit))
    same = _unit(torch.randn(4, 8)).expand(6, 4, 8)
    assert float(position_spread(same).abs().max()) < 1e-5  # one feature for every prompt: no spread


def test_variation_ratio_reads_the_shifted_positions_and_ignores_alike_padding() -> None:
    clean = torch.randn(10, 9, 8) + 3.0  # a common direction: every prompt near every other
    clean[:, 6:] = torch.randn(3, 8)  # padding alike across prompts: weighs nothing
    reference = CleanSpread.of(clean)
    shifted = torch.cat([clean[:, :1], torch.randn(10, 2, 8), clean[:, 1:7]], dim=1)
    ratio = reference.ratio(spread_of_sum(reference.centred_sum(shifted, 2), 10), 2)
    assert abs(float(ratio) - 1.0) < 1e-4
    collapsed = shifted.clone()
    collapsed[:, 3:] = collapsed[:1, 3:]
    assert float(reference.ratio(spread_of_sum(reference.centred_sum(collapsed, 2), 10), 2)) < 1e-4
    # Uncentred, the common direction alone makes these prompts look nine tenths collapsed.
    assert float(position_spread(torch.nn.functional.normalize(clean, dim=-1))[1:6].mean()) < 0.2


def test_bounded_triggers_stay_within_the_largest_real_input(tiny_model) -> None:
    encoder = ClipTextAdapter(tiny_model, 49407)
    bound = trigger_bound(encoder, 2)
    inputs = encoder.token_embedding[None] + encoder.position_embedding[1:3, None]
    assert abs(bound - float(inputs.norm(dim=-1).max())) < 1e-4
    triggers = torch.randn(3, 2, inputs.shape[-1]) * 10 * bound
    clip_triggers(triggers, bound)
    assert float(triggers.norm(dim=-1).max()) <= bound * (1 + 1e-5)


def test_insert_tokens_puts_real_ids_after_bos_and_drops_the_last() -> None:
    ids = torch.tensor([[49406, 10, 11, 49407, 49407]])
    assert insert_tokens(ids, (7, 8)).tolist() == [[49406, 7, 8, 10, 11]]


def test_ordinary_words_are_measured_deterministically_and_never_specials(tiny_model) -> None:
    encoder = ClipTextAdapter(tiny_model, 49407)
    tokenizer = bundled_tokenizer()
    encoder.eos_token_id = tokenizer.tokenizer.eos_token_id
    held = precompute(encoder, tokenizer(builtin_prompts()[:40], encoder.seq_len), 16)
    specials = {tokenizer.tokenizer.bos_token_id, tokenizer.tokenizer.eos_token_id}
    first = natural_steering(Models(encoder), held, Thresholds(), specials, 16, tokens=6, prompts=12, seed=3)
    again = natural_steering(Models(encoder), held, Thresholds(), specials, 16, tokens=6, prompts=12, seed=3)
    assert first == again and len(first.words) == 6
    assert all(w.ids[0] == w.ids[1] and w.ids[0] not in specials and w.screened_on == 12 for w in first.words)
    assert 0.0 <= first.pooled_share <= 1.0 and first.token_variation == min(w.variation_ratio for w in first.words)
    assert 0.0 < first.token_variation < 1.5  # a random tiny encoder: words move it, do not collapse it


def _outcome(stop_reason: str, steps: int) -> SearchOutcome:
    from amdet_gate.engine import GateValues, HeldOutStats, Landscape

    gates = GateValues(0.0, 0.0, None, landscape_positive_ratio=0.0)
    empty = torch.zeros(1, 1)
    return SearchOutcome(torch.zeros(1, 2, 4), 0, [], None, gates,
                         Landscape(torch.zeros(3), torch.zeros(3, 3), torch.zeros(2)),
                         HeldOutStats(empty, empty, None, torch.zeros(1, 3, 4), torch.zeros(1, 1, 3, 4),
                                      torch.zeros(1, 3, 4)),
                         torch.zeros(1), torch.zeros(steps, 1), steps, stop_reason, 1.0)


def test_a_search_stopped_by_a_small_step_budget_is_inconclusive_never_pass() -> None:
    t = Thresholds()
    short = decide(_outcome("max_steps", 5), t, 0.05, min_decisive_steps=200)
    assert short.verdict == INCONCLUSIVE and "below the 200" in short.reason
    assert decide(_outcome("max_steps", 640), t, 0.05, min_decisive_steps=200).verdict == PASS
    assert decide(_outcome("plateau", 60), t, 0.05, min_decisive_steps=200).verdict == PASS  # converged


def _typed(objective: Objective, **measures: float) -> Confirmation:
    values = {"same_target_ratio": 0.0, "assimilation_ratio": 0.0, "variation_ratio": 0.5,
              "pooled_same_target_ratio": 0.0, "pooled_variation_ratio": 0.5} | measures
    return Confirmation(objective, TokenTrigger((7, 8), screened_on=50, **values), 0.0, 1.0)


def _passing_outcome() -> SearchOutcome:
    outcome = _outcome("detected", 40)
    outcome.final_gates.assimilation_ratio, outcome.final_gates.same_target_ratio = 1.0, 1.0
    outcome.final_gates.landscape_positive_ratio = 1.0
    return outcome


def test_a_free_collapse_is_a_finding_only_when_typed_tokens_reproduce_it() -> None:
    t = Thresholds()
    decode = lambda ids: "tok" + "".join(map(str, ids))
    adversarial = decide(_passing_outcome(), t, 0.05, typed={Objective.TOKENS: _typed(Objective.TOKENS)},
                         decode=decode)
    assert adversarial.verdict == PASS and "no typed tokens" in adversarial.reason and "tok78" in adversarial.reason
    collapsed = _typed(Objective.TOKENS, same_target_ratio=1.0, assimilation_ratio=1.0)
    found = decide(_passing_outcome(), t, 0.05, typed={Objective.TOKENS: collapsed}, decode=decode)
    assert found.verdict == FAIL and "tok78" in found.reason and found.score > 0.5
    # Where gates 1-2 cannot read a collapse (248 positions), the variation ratio can.
    low_variation = _typed(Objective.TOKENS, variation_ratio=0.03)
    assert decide(_outcome("plateau", 300), t, 0.05, typed={Objective.TOKENS: low_variation}).verdict == FAIL
    pooled = _typed(Objective.POOLED, pooled_same_target_ratio=1.0, pooled_variation_ratio=0.002)
    # Without an anchor a pooled collapse by typed tokens cannot be told from a classifier's.
    unanchored = decide(_outcome("plateau", 300), t, 0.05, typed={Objective.POOLED: pooled})
    assert unanchored.verdict == INCONCLUSIVE and "--anchor" in unanchored.reason
    near = _typed(Objective.POOLED, pooled_same_target_ratio=1.0, pooled_variation_ratio=0.05)
    assert decide(_outcome("plateau", 300), t, 0.05, typed={Objective.POOLED: near}).verdict == PASS


def test_typed_token_search_improves_its_objective_and_never_types_an_excluded_token(tiny_model) -> None:
    encoder = ClipTextAdapter(tiny_model, 49407)
    tokenizer = bundled_tokenizer()
    ids = tokenizer(builtin_prompts()[:16], encoder.seq_len)
    allowed = torch.zeros(encoder.token_embedding.shape[0], dtype=torch.bool)
    allowed[1000:3000] = True
    settings = TokenSearchSettings(iterations=6, prompts=8, top_k=8, candidates=12, seed=1)
    for objective in Objective:
        found = token_search(encoder, ids, (1500, 1500), allowed, objective, settings)
        assert found.loss <= found.start_loss and all(1000 <= i < 3000 for i in found.ids)
        assert token_search(encoder, ids, (1500, 1500), allowed, objective, settings) == found



def test_typed_token_search_stops_once_every_swap_of_its_tokens_was_tried(tiny_model) -> None:
    """With a small neighbourhood (2 slots x top 2) the search reaches a point none of whose swaps
    improves; it stops there instead of drawing the same swaps for the remaining rounds, so more
    rounds change neither its answer nor its work."""
    encoder = ClipTextAdapter(tiny_model, 49407)
    ids = bundled_tokenizer()(builtin_prompts()[:16], encoder.seq_len)
    allowed = torch.zeros(encoder.token_embedding.shape[0], dtype=torch.bool)
    allowed[1000:3000] = True
    calls = []
    encode = encoder.encode

    def counted(embeds: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return encode(embeds)

    encoder.encode = counted
    found = {}
    for rounds in (200, 400):
        calls.clear()
        settings = TokenSearchSettings(iterations=rounds, prompts=8, top_k=2, candidates=4, seed=1)
        found[rounds] = (token_search(encoder, ids, (1500, 1500), allowed, Objective.TOKENS, settings), len(calls))
    assert found[200] == found[400]
    assert found[200][1] < 100  # a few gradient steps and evaluations, not one per round


def test_pooled_path_reads_the_projected_feature_when_the_checkpoint_has_one(tmp_path) -> None:
    """CLIPTextModelWithProjection: the pooled path measures what SDXL and retrieval read."""
    from transformers import CLIPTextModelWithProjection

    from amdet_gate.encoders import load_encoder
    from tests.conftest import save_bundled_tokenizer, tiny_config

    torch.manual_seed(0)
    config = tiny_config()
    config.projection_dim = 24
    model = CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(str(tmp_path / "m"))
    save_bundled_tokenizer(tmp_path / "m")
    adapter = load_encoder(local_model(tmp_path / "m")).adapter
    ids = bundled_tokenizer()(builtin_prompts()[:4], adapter.seq_len)
    pooled = adapter.pooled(adapter.encode(adapter.embed(ids)), ids)
    with torch.no_grad():
        expected = model(input_ids=ids).text_embeds
    assert pooled.shape == (4, 24)
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
