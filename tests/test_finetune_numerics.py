"""Fine-tuning numerics against independent implementations: transformers and peft.

On tiny random Gemma 1, 2 and 3 models made by transformers (and loaded here through our
transformers checkpoint reader), with a batch that has right padding and a prompt masked out:
- the training loss equals transformers' loss on the same tokens and label mask (1e-5);
- with LoRA rank 4 on query and value, the same LoRA factors mapped into `peft`, the gradients
  of the LoRA weights equal peft's (1e-5), and one Adam step moves them alike.

Loss reduction: transformers averages over the labels it keeps, which is Keras'
`reduction="mean_with_sample_weight"`; the task's default loss (KerasHub's) is
"sum_over_batch_size", the same sum divided by every position of the batch instead.
Our gradients come out of `train_on_batch` with SGD at learning rate 1 (old - new weights), so
they are what `fit`'s train step computes, on every backend (run eagerly, to save compiling).
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_huggingface import _transformers_model

from keras_gemma import GemmaBackbone, GemmaCausalLM

RANK = 4
LENGTH = 10
VOCABULARY = 160  # the tiny transformers models' vocabulary


def _batch():
    """Tokens [2, LENGTH + 1], the real-token mask and the labels' mask (answers only)."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(4, VOCABULARY, size=(2, LENGTH + 1)).astype("int32")
    mask = np.ones_like(tokens, dtype=bool)
    mask[1, -4:] = False  # right padding in the second row
    tokens[1, -4:] = 0
    trained = mask & (np.arange(LENGTH + 1) >= np.array([[4], [3]]))  # prompts of 4 and 3
    return tokens, mask, trained


def _ours(tokens, mask, trained):
    """Our (x, y, sample_weight): the inputs and labels are the tokens shifted by one."""
    x = {"token_ids": tokens[:, :-1], "padding_mask": mask[:, :-1]}
    return x, tokens[:, 1:], trained[:, 1:].astype("float32")


def _transformers_loss(model, tokens, mask, trained):
    import torch

    labels = np.where(trained, tokens, -100)  # transformers shifts the labels itself
    return model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
    ).loss


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def models(request, tmp_path_factory):
    """(transformers model, its checkpoint directory) of one generation, 2 KV heads."""
    model = _transformers_model(request.param, num_key_value_heads=2)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return model, str(directory)


def _lora_factors(backbone, seed=5):
    """Random nonzero LoRA factors for every query/value layer: {(layer, name): (a, b)}."""
    rng = np.random.default_rng(seed)
    factors = {}
    for index, block in enumerate(backbone.transformer_layers):
        for name in ("query", "value"):
            dense = getattr(block.attention, f"{name}_dense")
            a = rng.normal(0, 0.2, tuple(dense.lora_kernel_a.shape)).astype("float32")
            b = rng.normal(0, 0.2, tuple(dense.lora_kernel_b.shape)).astype("float32")
            factors[(index, name)] = (a, b)
    return factors


def _set_ours(backbone, factors):
    for (index, name), (a, b) in factors.items():
        dense = getattr(backbone.transformer_layers[index].attention, f"{name}_dense")
        dense.lora_kernel_a.assign(a)
        dense.lora_kernel_b.assign(b)


def _read_ours(backbone):
    values = {}
    for index, block in enumerate(backbone.transformer_layers):
        for name in ("query", "value"):
            dense = getattr(block.attention, f"{name}_dense")
            values[(index, name)] = (to_numpy(dense.lora_kernel_a), to_numpy(dense.lora_kernel_b))
    return values


def _peft_model(reference, factors):
    """`reference` wrapped by peft with our factors: Keras adds a @ b (kernel layout (out, in):
    a (heads, head_dim, rank), b (rank, hidden)) times alpha / rank = 1; peft adds
    lora_B @ lora_A times lora_alpha / r, so lora_B = a as (out, rank), lora_A = b."""
    import copy

    import peft
    import torch

    config = peft.LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    model = peft.get_peft_model(copy.deepcopy(reference), config)
    with torch.no_grad():
        for (index, name), (a, b) in factors.items():
            module = _peft_module(model, index, name)
            module.lora_B["default"].weight.copy_(torch.tensor(a.reshape(-1, RANK)))
            module.lora_A["default"].weight.copy_(torch.tensor(b))
    return model


def _peft_module(model, index, name):
    attention = model.base_model.model.model.layers[index].self_attn
    return attention.q_proj if name == "query" else attention.v_proj


def _peft_as_ours(model, factors, values):
    """{(layer, name): (a-shaped, b-shaped)} of what `values(module)` gives per LoRA module."""
    out = {}
    for (index, name), (a, b) in factors.items():
        lora_b, lora_a = values(_peft_module(model, index, name))
        out[(index, name)] = (lora_b.reshape(a.shape), lora_a.reshape(b.shape))
    return out


def _compile(lm, optimizer, factors):
    _set_ours(lm.backbone, factors)
    # Eager steps: `train_step`'s math as in `fit`, without compiling a step twice per model
    # (tracing costs this test more than the steps themselves).
    lm.compile(optimizer=optimizer, loss=_loss(), weighted_metrics=[], run_eagerly=True)


def _assert_close(actual, expected, atol=1e-5):
    for key in expected:
        for got, want in zip(actual[key], expected[key]):
            np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=str(key))


def test_loss_lora_gradients_and_adam_step_match_transformers_and_peft(models):
    import torch

    reference, directory = models
    tokens, mask, trained = _batch()
    x, y, weights = _ours(tokens, mask, trained)
    lm = GemmaCausalLM(GemmaBackbone.from_preset(directory, dtype="float32"))

    # The loss of a batch with padding and prompts masked out.
    with torch.no_grad():
        expected = float(_transformers_loss(reference, tokens, mask, trained))
    lm.compile(loss=_loss())
    actual = float(to_numpy(lm.compute_loss(x=x, y=y, y_pred=lm(x), sample_weight=weights)))
    assert abs(actual - expected) < 1e-5, (actual, expected)
    # The default (KerasHub's) reduction: the same weighted sum over every position.
    lm.compile()
    default = float(to_numpy(lm.compute_loss(x=x, y=y, y_pred=lm(x), sample_weight=weights)))
    assert abs(default - expected * weights.sum() / weights.size) < 1e-5

    lm.backbone.enable_lora(rank=RANK)
    factors = _lora_factors(lm.backbone)
    assert len(lm.trainable_variables) == 2 * len(factors)

    # peft: gradients of one backward pass, then one Adam step.
    model = _peft_model(reference, factors)
    _transformers_loss(model, tokens, mask, trained).backward()
    expected_gradients = _peft_as_ours(
        model,
        factors,
        lambda m: (
            to_numpy(m.lora_B["default"].weight.grad),
            to_numpy(m.lora_A["default"].weight.grad),
        ),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(factors)  # only the LoRA factors train, as ours
    torch.optim.Adam(trainable, lr=1e-3, eps=1e-8).step()
    expected_adam = _peft_as_ours(
        model,
        factors,
        lambda m: (
            m.lora_B["default"].weight.detach().numpy(),
            m.lora_A["default"].weight.detach().numpy(),
        ),
    )

    # Ours: SGD at learning rate 1 turns the step into the gradient.
    _compile(lm, keras.optimizers.SGD(learning_rate=1.0), factors)
    lm.train_on_batch(x, y, sample_weight=weights)
    after = _read_ours(lm.backbone)
    gradients = {
        key: (factors[key][0] - after[key][0], factors[key][1] - after[key][1]) for key in factors
    }
    assert max(np.abs(g).max() for pair in gradients.values() for g in pair) > 1e-3
    _assert_close(gradients, expected_gradients)

    # Keras' Adam adds epsilon to sqrt(v) before its bias correction and torch's after; on the
    # first step eps_keras = eps_torch * sqrt(1 - beta_2) makes the two formulas the same.
    epsilon = 1e-8 * np.sqrt(1 - 0.999)
    _compile(lm, keras.optimizers.Adam(learning_rate=1e-3, epsilon=epsilon), factors)
    lm.train_on_batch(x, y, sample_weight=weights)
    _assert_close(_read_ours(lm.backbone), expected_adam)
