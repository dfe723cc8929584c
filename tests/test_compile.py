"""The pretraining step under `torch.compile(fullgraph=True)`: one graph without a break, the eager step's losses.

The step's random draws are made eagerly by `sample_step_randomness` and passed in as `randomness`; the compiled
forward then draws nothing itself. The compiled-vs-eager comparisons use the `aot_eager` backend (dynamo's graph and
AOTAutograd's joint forward/backward graph, run by eager kernels): it checks everything our code controls under
compile (tracing, functionalisation, autograd of the traced graph) in seconds, where inductor's C++ code generation
takes minutes on a CPU; inductor's own numbers are in docs/PERFORMANCE.md ("Compiling the step").
"""

import pytest
import torch
from conftest import real_speech_batch, tiny_config

from data2vec_aqc_hf import Data2VecAQCForPreTraining
from data2vec_aqc_hf.modeling_data2vec_aqc import encode_with_layer_mask

LOSS_TERMS = ("loss", "regression_loss", "student_contrastive_loss", "teacher_contrastive_loss", "diversity_loss",
              "feature_penalty")


def tiny_model(objective="aqc", **overrides):
    torch.manual_seed(0)
    return Data2VecAQCForPreTraining(tiny_config(objective=objective, **overrides)).train()


@pytest.fixture(scope="module")
def short_batch():
    return real_speech_batch(2, 0.5)  # 2 x 0.5 s of speech, the second one shorter (padding)


def step_loss(model, input_values, attention_mask, randomness):
    return model(input_values, attention_mask, randomness=randomness).loss


@pytest.mark.parametrize("objective,overrides", [
    ("aqc", {}),
    ("data2vec", {}),
    ("aqc", {"layerdrop": 0.2, "hidden_dropout": 0.1}),  # LayerDrop and dropout inside the graph
])
def test_training_forward_and_loss_have_no_graph_break(objective, overrides, short_batch):
    model = tiny_model(objective, **overrides)
    x, mask = short_batch
    randomness = model.sample_step_randomness(x, mask, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step_loss)(model, x, mask, randomness)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("objective", ["aqc", "data2vec"])
def test_sampled_randomness_reproduces_the_generator_step_bit_for_bit(objective, speech_batch):
    model = tiny_model(objective)
    x, mask = speech_batch
    with_generator = model(x, mask, generator=torch.Generator().manual_seed(4))
    randomness = model.sample_step_randomness(x, mask, torch.Generator().manual_seed(4))
    passed_in = model(x, mask, randomness=randomness)
    for key in LOSS_TERMS + ("mask_time_indices",):
        if getattr(with_generator, key) is not None:
            assert torch.equal(getattr(with_generator, key), getattr(passed_in, key)), key


def test_randomness_is_not_combined_with_other_draws(speech_batch):
    model = tiny_model()
    x, mask = speech_batch
    randomness = model.sample_step_randomness(x, mask, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="randomness holds every draw"):
        model(x, mask, randomness=randomness, generator=torch.Generator().manual_seed(0))


def compiled_and_eager_step(model, x, mask, seed=3):
    """Loss terms and gradients of one step, compiled (`aot_eager`, fullgraph) and eager, from the same draws."""
    randomness = model.sample_step_randomness(x, mask, torch.Generator().manual_seed(seed))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for forward in (compiled, model):
        out = forward(x, mask, randomness=randomness)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append(({k: getattr(out, k).detach() for k in LOSS_TERMS if getattr(out, k) is not None}, grads))
    return results


@pytest.mark.parametrize("objective", ["aqc", "data2vec"])
def test_compiled_step_gives_the_eager_losses_and_gradients(objective, short_batch):
    torch._dynamo.reset()
    model = tiny_model(objective)
    (compiled_losses, compiled_grads), (eager_losses, eager_grads) = compiled_and_eager_step(model, *short_batch)
    assert compiled_losses.keys() == eager_losses.keys() and len(eager_losses) == (6 if objective == "aqc" else 2)
    for key, value in eager_losses.items():
        torch.testing.assert_close(compiled_losses[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert compiled_grads.keys() == eager_grads.keys()
    scale = max(g.abs().max() for g in eager_grads.values())
    for name, grad in eager_grads.items():  # gradients relative to the largest one (some are ~0, e.g. key biases)
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_compiled_step_compiles_once_more_for_new_shapes_then_stays_dynamic():
    """Pretraining batches change shape every step; after the first shape's graph, one dynamic graph serves every
    other batch of more than one utterance (no recompilation per shape)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for batch_size, seconds in ((2, 0.5), (3, 0.6), (2, 0.7), (4, 0.45)):
        x, mask = real_speech_batch(batch_size, seconds)
        randomness = model.sample_step_randomness(x, mask, torch.Generator().manual_seed(batch_size))
        compiled(x, mask, randomness=randomness)
    assert counter.frame_count == 2


def test_layer_mask_encoder_equals_transformers_encoder():
    """`encode_with_layer_mask` (LayerDrop under compile) computes transformers' encoder exactly: all layers kept it is
    the stock forward, a dropped layer is the stock forward without it."""
    model = tiny_model().eval()
    encoder = model.data2vec_audio.encoder
    hidden = torch.randn(2, 12, model.config.hidden_size)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 9:] = False
    with torch.no_grad():
        stock = encoder(hidden.clone(), attention_mask=valid).last_hidden_state
        masked = encode_with_layer_mask(encoder, hidden.clone(), valid, torch.tensor([True, True]))
        torch.testing.assert_close(masked, stock, rtol=0, atol=0)
        dropped = encode_with_layer_mask(encoder, hidden.clone(), valid, torch.tensor([False, True]))
        layers = encoder.layers
        encoder.layers = layers[1:]
        try:
            without_first = encoder(hidden.clone(), attention_mask=valid).last_hidden_state
        finally:
            encoder.layers = layers
        torch.testing.assert_close(dropped, without_first, rtol=0, atol=0)
