"""The scan's math: measures, insertion, batched gates, Hessians, determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from amdet_gate.encoders.clip import ClipTextAdapter
from amdet_gate.engine import (
    Centres,
    Models,
    PooledGates,
    SearchSettings,
    Thresholds,
    assimilation,
    centred,
    clean_pooled,
    eos_positions,
    gate_values,
    held_out_stats,
    hessian_eigenvalues,
    insert_trigger,
    optimisation_length,
    pooled_gates,
    pooled_with_trigger,
    position_similarity,
    precompute,
    screened_gate_values,
    search,
)
from amdet_gate.prompts import builtin_prompts
from amdet_gate.tokenizer import bundled_tokenizer
from amdet_gate.verdict import check_score, margin


def test_assimilation_equals_mean_of_cosine_matrix() -> None:
    features = torch.randn(3, 9, 16)
    unit = torch.nn.functional.normalize(features, dim=-1)
    explicit = (unit @ unit.transpose(1, 2)).mean(dim=(1, 2))
    torch.testing.assert_close(assimilation(features), explicit)
    same = torch.randn(16).expand(9, 16)
    assert abs(float(assimilation(same)) - 1.0) < 1e-5


def test_position_similarity() -> None:
    a = torch.randn(4, 7, 8)
    torch.testing.assert_close(position_similarity(a, a), torch.ones(4))
    torch.testing.assert_close(position_similarity(a, -a), -torch.ones(4))


@pytest.mark.parametrize("k", [1, 2])
def test_insert_trigger_shifts_tokens_and_drops_last(k: int) -> None:
    embeds = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    triggers = -torch.arange(1, 4 * k * 3 + 1, dtype=torch.float).reshape(4, k, 3)
    out = insert_trigger(embeds, triggers)
    assert out.shape == (4, 2, 5, 3)
    torch.testing.assert_close(out[1, 0, 0], embeds[0, 0])  # BOS stays
    torch.testing.assert_close(out[1, 0, 1 : 1 + k], triggers[1])  # the trigger's vectors, no position embedding
    torch.testing.assert_close(out[2, 1, 1 + k :], embeds[1, 1 : 5 - k])  # the rest shifted, last k dropped


def test_hessian_eigenvalues_of_bowl_and_saddle() -> None:
    grid = torch.linspace(-1, 1, 21)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    spacing = float(grid[1] - grid[0])
    bowl = hessian_eigenvalues(a**2 + 2 * b**2 + 0.5 * a * b, spacing)
    assert (bowl > 0).all()
    expected = torch.linalg.eigvalsh(torch.tensor([[2.0, 0.5], [0.5, 4.0]]))
    torch.testing.assert_close(bowl[:2].sort().values, expected, rtol=1e-3, atol=1e-3)
    saddle = hessian_eigenvalues(a**2 - b**2, spacing)
    assert abs(float((saddle > 1e-6).float().mean()) - 0.5) < 1e-6


def test_margin_and_score() -> None:
    assert margin(1.0, 0.8) == 1.0 and margin(0.0, 0.8) == -1.0 and margin(0.8, 0.8) == 0.0
    from amdet_gate.engine import GateValues

    t = Thresholds()
    all_pass = GateValues(0.9, 1.0, None, 0.95)
    assert check_score(all_pass, t) > 0.5
    one_fails = replace(all_pass, same_target_ratio=0.5)
    assert check_score(one_fails, t) < 0.5


def _tiny_features(tiny_model, n: int):
    adapter = ClipTextAdapter(tiny_model, 49407)
    ids = bundled_tokenizer()(builtin_prompts()[:n], 77)
    return adapter, precompute(adapter, ids, 16)


def test_batched_gates_equal_one_prompt_at_a_time(tiny_model) -> None:
    adapter, held = _tiny_features(tiny_model, 12)
    triggers = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(0))
    batched = held_out_stats(Models(adapter), held, triggers, chunk_size=8)
    with torch.no_grad():
        first = [adapter.encode(insert_trigger(held.embeds[:1], t[None]))[0, 0] for t in triggers]
        for r, trig in enumerate(triggers):
            for i in range(len(held)):
                single = adapter.encode(insert_trigger(held.embeds[i : i + 1], trig[None]))[0, 0]
                torch.testing.assert_close(batched.assimilation[r, i], assimilation(single), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(batched.same_target[r, i], position_similarity(first[r], single),
                                           rtol=1e-4, atol=1e-5)


def test_search_is_deterministic_for_a_seed(tiny_model) -> None:
    adapter, feats = _tiny_features(tiny_model, 60)
    opt = type(feats)(feats.ids[:40], feats.embeds[:40], feats.clean[:40])
    held = type(feats)(feats.ids[40:], feats.embeds[40:], feats.clean[40:])
    settings = SearchSettings(seed=3, restarts=2, max_steps=12, batch_size=4, landscape_points=6,
                              check_every=4, loss_trigger=0.0, pooled_steps=6, pooled_check_every=3,
                              screen_prompts=8)
    runs = [search(Models(adapter), opt, held, settings, Thresholds()) for _ in range(2)]
    torch.testing.assert_close(runs[0].triggers, runs[1].triggers, rtol=0, atol=0)
    assert runs[0].pooled is not None and runs[0].pooled.steps == settings.pooled_steps
    assert runs[0].triggers.shape == (settings.restarts, settings.trigger_vectors, 32)
    assert runs[0].pooled.triggers.shape == (2 * settings.restarts, settings.trigger_vectors, 32)
    torch.testing.assert_close(runs[0].pooled.triggers, runs[1].pooled.triggers, rtol=0, atol=0)
    assert runs[0].pooled.gates == runs[1].pooled.gates
    torch.testing.assert_close(runs[0].loss_history, runs[1].loss_history, rtol=0, atol=0)
    assert runs[0].final_gates == runs[1].final_gates
    other = search(Models(adapter), opt, held, replace(settings, seed=4), Thresholds())
    assert not torch.equal(other.triggers, runs[0].triggers)


def test_lazy_clean_features_give_the_stored_ones_result(tiny_model) -> None:
    # The scan keeps no clean outputs for the optimisation prompts: each batch's are computed
    # when drawn. The search must not notice the difference.
    adapter, feats = _tiny_features(tiny_model, 60)
    held = feats.subset(40, 60)
    settings = SearchSettings(seed=1, restarts=2, max_steps=8, batch_size=4, landscape_points=6,
                              loss_trigger=0.0, check_every=4, pooled_steps=4, screen_prompts=8)
    stored = search(Models(adapter), feats.subset(0, 40), held, settings, Thresholds())
    lazy_opt = precompute(adapter, feats.ids[:40], 16, clean=False)
    assert lazy_opt.clean is None
    lazy = search(Models(adapter), lazy_opt, held, settings, Thresholds())
    torch.testing.assert_close(lazy.loss_history, stored.loss_history, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lazy.triggers, stored.triggers, rtol=1e-4, atol=1e-5)


def test_clean_pooled_cut_after_eos_equals_the_full_sequences(tiny_model) -> None:
    adapter, feats = _tiny_features(tiny_model, 10)
    torch.testing.assert_close(clean_pooled(adapter, feats.embeds, feats.ids), adapter.pooled(feats.clean, feats.ids),
                               rtol=1e-4, atol=1e-5)


def test_screened_gates_decide_exactly_like_full_gates(tiny_model) -> None:
    adapter, held = _tiny_features(tiny_model, 40)
    triggers = torch.randn(4, 1, 32, generator=torch.Generator().manual_seed(1))  # "mixed" holds both outcomes
    loose = Thresholds(assimilation=0.0, same_target=-1.0, assimilation_ratio=0.5, same_target_ratio=0.5)
    mixed = Thresholds(assimilation=0.0, same_target=0.6, assimilation_ratio=0.5, same_target_ratio=0.88)
    for t in (Thresholds(), loose, mixed):
        full = gate_values(held_out_stats(Models(adapter), held, triggers, 16), t)
        screened = screened_gate_values(Models(adapter), held, triggers, t, 16, screen=10)
        for f, s in zip(full, screened, strict=True):
            assert f.passed(t) == s.passed(t)
            if all(f.passed(t).values()):  # survivors are computed in full (the mean summed slice by slice)
                assert replace(s, mean_assimilation=0.0) == replace(f, mean_assimilation=0.0)
                assert abs(s.mean_assimilation - f.mean_assimilation) < 1e-5
            else:  # dropped after a whole number of 10-prompt slices, or run to the end
                assert s.screened_on is None or s.screened_on in (10, 20, 30)
        if t is mixed:  # the case must hold both outcomes to test anything
            assert len({all(f.passed(t).values()) for f in full}) == 2


def test_screening_drops_a_trigger_once_it_has_enough_misses(tiny_model) -> None:
    adapter, held = _tiny_features(tiny_model, 40)
    triggers = torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(3))
    full = gate_values(held_out_stats(Models(adapter), held, triggers, 16), Thresholds())
    assert all(f.same_target_ratio < 0.9 for f in full)  # random triggers: most prompts miss
    # 0.995 of 40 prompts: one miss fails the gate, so the first 10-prompt slice decides.
    screened = screened_gate_values(Models(adapter), held, triggers, Thresholds(), 16, screen=10)
    assert [s.screened_on for s in screened] == [10, 10]
    assert all(not s.passed(Thresholds())["same_target_ratio"] for s in screened)


def test_optimisation_steps_run_to_the_last_eos_plus_padding(tiny_model) -> None:
    adapter, feats = _tiny_features(tiny_model, 10)
    last_eos = int((feats.ids == 49407).int().argmax(dim=-1).max())
    settings = SearchSettings(trigger_vectors=2, pad_positions=3)
    assert optimisation_length(feats.ids, 49407, settings) == last_eos + 2 + 1 + 3
    assert optimisation_length(feats.ids, 49407, replace(settings, pad_positions=-1)) == 77
    assert optimisation_length(feats.ids, 49407, replace(settings, pad_positions=500)) == 77
    # The mask is causal: the kept positions are the full sequences' own.
    triggers = torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(4))
    length = optimisation_length(feats.ids, 49407, settings)
    with torch.no_grad():
        cut = adapter.encode(insert_trigger(feats.embeds[:, :length], triggers))
        full = adapter.encode(insert_trigger(feats.embeds, triggers))
    torch.testing.assert_close(cut, full[:, :, :length], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_pooled_features_are_cut_at_eos_without_changing_them(tiny_model, k: int) -> None:
    """The mask is causal: cutting the sequences after the last EOS leaves every pooled feature as it is."""
    adapter, feats = _tiny_features(tiny_model, 10)
    triggers = torch.randn(2, k, 32, generator=torch.Generator().manual_seed(2))
    eos = eos_positions(feats.ids, 49407, k)
    assert int(eos.max()) < 76  # the cut is real
    with torch.no_grad():
        cut = pooled_with_trigger(adapter, feats.embeds, eos, triggers)
        full = adapter.encode(insert_trigger(feats.embeds, triggers))
    for r in range(2):
        for i in range(10):
            torch.testing.assert_close(cut[r, i], full[r, i, eos[i]], rtol=1e-4, atol=1e-5)
            # the shifted EOS is the prompt's own EOS token, k slots right
            assert int(feats.ids[i, eos[i] - k]) == 49407


def test_pooled_gates_count_prompts_at_the_first_prompts_target(tiny_model) -> None:
    adapter, held = _tiny_features(tiny_model, 20)
    eos = eos_positions(held.ids, 49407, 2)
    triggers = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(5))
    centre = torch.nn.functional.normalize(adapter.pooled(held.clean, held.ids), dim=-1).mean(dim=0)
    with torch.no_grad():
        expected = centred(pooled_with_trigger(adapter, held.embeds, eos, triggers), centre)
    similarity_to_first = (expected * expected[:, :1]).sum(dim=-1)
    ranked = similarity_to_first[0].sort().values  # half the prompts above it, none within rounding of it
    threshold = float(ranked[9] + ranked[10]) / 2
    t = Thresholds(pooled_same_target=threshold, pooled_same_target_ratio=0.3)
    centres = Centres(centre, None)
    gates, similarity = pooled_gates(Models(adapter), held, eos, centres, triggers, t, chunk_size=6)
    torch.testing.assert_close(similarity, similarity_to_first, rtol=1e-4, atol=1e-5)
    shares = [n / 20 for n in (similarity_to_first > threshold).sum(dim=1).tolist()]
    assert [g.same_target_ratio for g in gates] == shares
    assert 0.3 < shares[0] < 0.7
    assert gates[0].anchor_difference_ratio is None
    assert gates[0].passed(t) == {"pooled_same_target_ratio": shares[0] > 0.3}
    # An anchor identical to the model collapses exactly where the model does: the anchor gate
    # counts the prompts where it does not, the complement of the same-target share.
    with_anchor, _ = pooled_gates(Models(adapter, adapter), held, eos, Centres(centre, centre), triggers, t, 6)
    assert [g.anchor_difference_ratio for g in with_anchor] == [(20 - round(x * 20)) / 20 for x in shares]
    assert isinstance(with_anchor[0], PooledGates) and "pooled_anchor_difference_ratio" in with_anchor[0].passed(t)


def test_gate_progress_counts_as_improvement_for_the_plateau_rule(tiny_model, monkeypatch) -> None:
    """A check that passes gate 1 and comes nearer one target defers the plateau stop."""
    import amdet_gate.engine.token_path as engine

    adapter, feats = _tiny_features(tiny_model, 40)
    # min_improvement 10: the loss never counts as improving, so only gate progress can; each
    # restart is checked once (at step 2), and the plateau stop comes `patience` steps later.
    settings = SearchSettings(restarts=2, batch_size=4, max_steps=40, check_every=2, loss_trigger=100.0,
                              min_improvement=10.0, patience=4, plateau_window=2, pooled_steps=0,
                              landscape_points=4, screen_prompts=8)
    steps = {}
    for assimilation_ratio in (0.5, 1.0):  # gate 1 fails / passes; same-target 0.5 either way
        monkeypatch.setattr(engine, "screened_gate_values", lambda *a, ar=assimilation_ratio, **k: [
            engine.GateValues(ar, 0.5, None) for _ in range(a[2].shape[0])])
        out = search(Models(adapter), feats.subset(0, 30), feats.subset(30, 40), settings, Thresholds())
        assert out.stop_reason == "plateau" and len(out.checks) == 2
        steps[assimilation_ratio] = out.steps
    assert steps == {0.5: 5, 1.0: 6}  # best step 1 (first loss) vs 2 (the check's progress), + patience 4


def test_the_engine_refuses_an_encoder_whose_traits_it_does_not_fit(tiny_model) -> None:
    """The engine's math assumes a causal encoder, the trigger after BOS and pooling at the first EOS; an
    adapter that says otherwise is nothing scannable (exit 3), never scanned under a wrong assumption."""
    from amdet_gate.encoders.clip import TRAITS
    from amdet_gate.engine import ENGINE_TRAITS, require_traits
    from amdet_gate.errors import ExitCode, UnsupportedModel

    adapter = ClipTextAdapter(tiny_model, 49407)
    assert adapter.traits == TRAITS == ENGINE_TRAITS
    require_traits(adapter)
    for other in (replace(TRAITS, causal=False), replace(TRAITS, trigger_slot=0)):
        adapter.traits = other
        with pytest.raises(UnsupportedModel, match="not supported") as info:
            search(Models(adapter), None, None, SearchSettings(), Thresholds())
        assert info.value.exit_code == ExitCode.NOTHING_SCANNABLE
