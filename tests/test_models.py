import math

import pytest
import torch
from torch import nn

from deepdigits.errors import DeepDigitsError
from deepdigits.models import REGISTRY, build_model, count_params, summary, summary_dict


@pytest.mark.parametrize(
    ("name", "params"),
    [("tutorial-000", 640_890), ("tutorial-001", 669_706), ("tutorial-002", 7_960),
     ("tutorial-003", 34_826), ("tutorial-004", 407_050)],
)
def test_exact_parameter_counts(name, params):
    model = build_model(name)
    assert count_params(model) == params
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)


def test_registry_holds_the_five_tutorials_and_ours():
    assert sorted(REGISTRY) == (["best-cnn", "fast-cnn", "strided-bn-cnn", "strided-cnn"]
                                + [f"tutorial-00{i}" for i in range(5)])


def test_strided_bn_cnn_has_no_full_size_feature_maps():
    model = build_model("strided-bn-cnn", seed=0)
    assert count_params(model) == 289_642
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    shapes = [row["output_shape"] for row in summary_dict(model)["layers"]]
    assert shapes[0] == [None, 32, 14, 14]  # the stride-2 stem: nothing runs on 28x28 maps
    assert max(shape[2] for shape in shapes if len(shape) == 4) == 14


def test_quick_recipe_learns_on_small_data(mnist):
    from deepdigits.classifier import Classifier
    from deepdigits.recipes import RECIPES

    recipe = RECIPES["quick"]
    assert (recipe.architecture, recipe.epochs, recipe.augment) == ("strided-bn-cnn", 3, True)
    clf = Classifier(recipe.architecture, seed=0)
    clf.fit(mnist.x_train[:2000], mnist.y_train[:2000], verbose=0, **{**recipe.fit_options(), "epochs": 2})
    assert clf.evaluate(mnist.x_test[:500], mnist.y_test[:500])["accuracy"] > 0.85  # chance is 0.1


def test_medium_recipe_is_quick_trained_twice_as_long():
    import dataclasses

    from deepdigits.recipes import RECIPES

    quick, medium = RECIPES["quick"], RECIPES["medium"]
    assert medium.epochs == 2 * quick.epochs == 6
    same = {"name", "epochs", "description"}
    assert {f.name: getattr(medium, f.name) for f in dataclasses.fields(medium) if f.name not in same} == \
        {f.name: getattr(quick, f.name) for f in dataclasses.fields(quick) if f.name not in same}


def test_strided_cnn_shapes_parameters_and_standardised_input():
    model = build_model("strided-cnn", seed=0)
    assert count_params(model) == 82_290
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    standardize = model[0]
    assert torch.allclose(standardize(torch.tensor([0.1307, 0.4388])), torch.tensor([0.0, 1.0]), atol=1e-6)
    assert not [key for key in model.state_dict() if key.startswith("0.")]  # constants, not weights to save
    text = summary(model, "strided-cnn")
    assert any(line.startswith("normalization (Normalization)") and line.endswith(" 0") for line in text.splitlines())
    assert any(line.startswith("conv2d (Conv2D, relu)") and "(None, 16, 12, 12)" in line for line in text.splitlines())


def test_strided_cnn_keeps_pytorch_default_initialisation():
    conv = build_model("strided-cnn", seed=0)[1]
    glorot_limit = math.sqrt(6 / (36 + 16 * 36))
    assert conv.weight.abs().max() > glorot_limit  # PyTorch's bound is 1/sqrt(fan_in) = 1/6
    assert conv.weight.abs().max() <= 1 / 6
    assert torch.count_nonzero(conv.bias) > 0


def test_aliases_resolve():
    assert count_params(build_model("cnn-32-64")) == 34_826


def test_keras_initialisation_glorot_uniform_zero_bias():
    model = build_model("tutorial-000", seed=1)
    first = model[1]
    limit = math.sqrt(6 / (784 + 784))
    assert first.weight.abs().max() <= limit and first.weight.abs().max() > 0.9 * limit
    assert torch.count_nonzero(first.bias) == 0
    conv = build_model("tutorial-003")[0]
    assert conv.weight.abs().max() <= math.sqrt(6 / (1 * 9 + 32 * 9))
    assert torch.count_nonzero(conv.bias) == 0


def test_seed_gives_identical_weights():
    a, b = build_model("tutorial-004", seed=7), build_model("tutorial-004", seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_summary_text_is_keras_like():
    text = summary(build_model("tutorial-003"), "tutorial-003")
    lines = text.splitlines()
    assert lines[0] == 'Model: "tutorial-003"'
    assert any(line.startswith("conv2d (Conv2D, relu)") and "(None, 32, 26, 26)" in line and line.endswith("320")
               for line in lines)
    assert any(line.startswith("conv2d_1 (Conv2D, relu)") and line.endswith("18,496") for line in lines)
    assert any(line.startswith("max_pooling2d_1 (MaxPooling2D)") and "(None, 64, 5, 5)" in line for line in lines)
    assert any(line.startswith("dense (Dense, softmax)") and line.endswith("16,010") for line in lines)
    assert lines[-3:] == ["Total params: 34,826 (136.04 KB)", "Trainable params: 34,826 (136.04 KB)",
                          "Non-trainable params: 0 (0.00 B)"]


def test_summary_dict():
    info = summary_dict(build_model("tutorial-002"), "tutorial-002")
    assert info["total_params"] == 7_960
    assert [(row["name"], row["activation"], row["params"]) for row in info["layers"]] == [
        ("flatten", None, 0), ("dense", "sigmoid", 7_850), ("dense_1", "softmax", 110)
    ]


def test_unknown_architecture():
    with pytest.raises(DeepDigitsError, match="unknown architecture 'resnet'; expected one of: tutorial-000"):
        build_model("resnet")


def test_summary_of_unregistered_sequential():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    assert "Total params: 7,850" in summary(model, "custom")


def test_dropout_keeps_each_value_with_probability_1_minus_p_in_bfloat16_too():
    from deepdigits.models import Dropout

    torch.manual_seed(0)
    for p in (0.2, 0.5):
        layer = Dropout(p).train()
        for dtype in (torch.float32, torch.bfloat16):
            masks = torch.stack([layer(torch.ones(128, 1601, dtype=dtype)) for _ in range(50)]).float()
            assert sorted(torch.unique(masks).tolist()) == [0.0, 1.0 / (1.0 - p)]
            # 10,245,000 draws: the standard error of the kept fraction is 1.6e-4 at most
            assert abs(float((masks > 0).float().mean()) - (1.0 - p)) < 8e-4
    x = torch.ones(6, requires_grad=True)
    y = Dropout(0.5).train()(x * 1)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes where the value was kept, scaled alike
    assert torch.equal(Dropout(0.5).eval()(x), x)


def test_dropout_mask_is_the_boolean_mask_scaled_in_the_activations_dtype_bit_for_bit():
    from deepdigits.models import Dropout

    for p in (0.1, 0.2, 0.25, 0.3, 0.5):
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            x = torch.randn(7, 13).to(dtype)  # 91 values: not a multiple of the four per 64-bit draw
            torch.manual_seed(5)
            y = Dropout(p).train()(x)
            torch.manual_seed(5)
            draws = torch.empty(92, dtype=torch.int16)
            draws.view(torch.int64).random_(-(2**63), None)
            keep = (draws[:91] >= round(p * 65536) - 32768).to(dtype).mul_(1.0 / (1.0 - p)).view(7, 13)
            assert y.dtype == dtype and torch.equal(y, x * keep), (p, dtype)
