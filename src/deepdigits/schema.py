"""The model.json document of a bundle, as a pydantic model: every field's type, range and length checked on load."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .calibrate import MAX_INTERCEPT, MAX_SLOPE, MAX_TEMPERATURE, MIN_TEMPERATURE, TEMPERATURE, TOP_LABEL
from .models import N_CLASSES

FORMAT = "deepdigits-bundle"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 16 << 20  # the shipped model.json is 11 KB; a bigger one is refused before parsing
MAX_MEMBERS = 64
MAX_EPOCHS = 10_000
MAX_CLASSES = 1000
MAX_MESSAGE = 240  # characters of a field's error, so a hostile document never makes a huge error line


def _finite_number(value: Any) -> int | float:
    # One validator instead of ``int | float``: a union's errors name its branches in the field path.
    # Integers stay integers (``epoch`` 1 is not rewritten as 1.0); booleans are not numbers here.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("finite_number", "expected a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "expected a finite number")
    return value


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> AfterValidator:
    def check(value: int | float) -> int | float:
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            left = "(" if low_open else "["
            raise PydanticCustomError("number_range", "expected a number in {interval}",
                                      {"interval": f"{left}{low if low is not None else '-inf'}, {high}]"})
        return value

    return AfterValidator(check)


def _matching(pattern: str, what: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise PydanticCustomError("string_pattern", "expected {what}", {"what": what})
        return value

    return AfterValidator(check)


Number = Annotated[Any, PlainValidator(_finite_number)]
NonNegative = Annotated[Number, _range(0, math.inf)]
Fraction = Annotated[Number, _range(0, 1)]
Count = Annotated[int, Field(ge=0)]
Text = Annotated[str, Field(max_length=4096)]
ShortText = Annotated[str, Field(max_length=128)]
Name = Annotated[str, Field(max_length=64),
                 _matching(r"[A-Za-z0-9][A-Za-z0-9._+-]*", "a name of letters, digits and . _ + -")]
ClassName = Annotated[str, Field(min_length=1, max_length=64)]
Sha256 = Annotated[str, Field(max_length=64), _matching(r"[0-9a-fA-F]{64}", "64 hexadecimal digits"),
                   AfterValidator(str.lower)]
FileName = Annotated[str, Field(max_length=255), _matching(
    r"[A-Za-z0-9_][A-Za-z0-9._-]*", "a plain file name inside the bundle folder (no path, no '..')")]


def _class_count(names: list[str]) -> list[str]:
    if len(names) != N_CLASSES:
        raise PydanticCustomError("class_count", "expected {n} class names (one per network output)",
                                  {"n": N_CLASSES})
    return names


def _recipe_members(value: Any) -> Any:
    # A recipe's ``members`` is a count (0: not an ensemble) or, once trained, the members' own recipes.
    if isinstance(value, bool):
        raise PydanticCustomError("recipe_members", "expected a count or a list of recipes")
    if isinstance(value, int):
        if not 0 <= value <= MAX_MEMBERS:
            raise PydanticCustomError("recipe_members", "expected a count in [0, {n}]", {"n": MAX_MEMBERS})
        return value
    if isinstance(value, list):
        if len(value) > MAX_MEMBERS:
            raise PydanticCustomError("too_long", "expected at most {n} items", {"n": MAX_MEMBERS})
        if not all(member is None or isinstance(member, dict) for member in value):
            raise PydanticCustomError("recipe_members", "expected a list of recipes (objects or null)")
        return value
    raise PydanticCustomError("recipe_members", "expected a count or a list of recipes")


class _Open(BaseModel):
    """Unknown fields are kept (bundles from newer versions still load); the file's size bounds them."""

    model_config = ConfigDict(extra="allow", strict=True)


class Weights(_Open):
    file: FileName = "model.safetensors"
    sha256: Sha256


class Preprocessing(_Open):
    input_shape: Annotated[list[Count], Field(max_length=8)] | None = None
    input_dtype: Text | None = None
    input_scale: Annotated[Number, _range(0, 1, low_open=True)] = 1.0 / 255.0


class DatasetInfo(_Open):
    name: ShortText | None = None
    source: Text | None = None
    sha256: Annotated[dict[ShortText, ShortText], Field(max_length=64)] | None = None


class RecipeInfo(_Open):
    name: ShortText | None = None
    architecture: ShortText | None = None
    loss: ShortText | None = None
    label_smoothing: Annotated[Number, _range(0, 1)] | None = None
    input_scale: Annotated[Number, _range(0, 1, low_open=True)] | None = None
    members: Annotated[Any, PlainValidator(_recipe_members)] = None


class Metrics(_Open):
    n: Count | None = None
    loss: Number | None = None
    accuracy: Fraction | None = None
    per_class: Annotated[list[dict[ShortText, Any]], Field(max_length=MAX_CLASSES)] | None = None
    confusion_matrix: Annotated[
        list[Annotated[list[Count], Field(max_length=MAX_CLASSES)]], Field(max_length=MAX_CLASSES)
    ] | None = None
    calibration: Annotated[dict[ShortText, Number], Field(max_length=32)] | None = None  # test ECE, NLL, Brier


def _temperature(value: int | float) -> int | float:
    if not MIN_TEMPERATURE < value < MAX_TEMPERATURE:  # a fit stays inside, see calibrate.FIT_RANGE
        raise PydanticCustomError("number_range", "expected a temperature in ({low}, {high})",
                                  {"low": MIN_TEMPERATURE, "high": MAX_TEMPERATURE})
    return value


class HeldOutImages(_Open):
    """The images a temperature was fit on: a slice of a dataset's training split, never its test set."""

    dataset: ShortText | None = None
    split: Literal["train"] | None = None
    start: Count | None = None
    stop: Count | None = None
    n: Count
    seen_in_training: bool | None = None


class TopLabelMap(_Open):
    """The top class's log-odds L against the others become ``intercept + slope * L`` (calibrated_logits)."""

    intercept: Annotated[Number, _range(-MAX_INTERCEPT, MAX_INTERCEPT)]
    slope: Annotated[Number, _range(0, MAX_SLOPE, low_open=True)]


class Calibration(_Open):
    """How probabilities are calibrated: ``softmax(logits / temperature)``, then a top-label map where the
    method names one; fit on held-out images."""

    method: Literal["temperature", "temperature+top-label"] = TEMPERATURE
    temperature: Annotated[Number, AfterValidator(_temperature)]
    top_label: TopLabelMap | None = None
    cross_validated_nll: Annotated[dict[ShortText, Number], Field(max_length=8)] | None = None
    fit_on: HeldOutImages | None = None
    fit_scores: Annotated[dict[ShortText, Number], Field(max_length=32)] | None = None  # ECE, NLL, Brier there
    note: Text | None = None

    @model_validator(mode="after")
    def _map_matches_method(self) -> Calibration:
        if (self.method == TOP_LABEL) != (self.top_label is not None):
            raise PydanticCustomError("calibration_map", "expected top_label exactly where method is {method!r}",
                                      {"method": TOP_LABEL})
        return self


MAX_OPEN_SET_INPUTS = 1 << 16  # inputs of an open_set head (the built-in model's reads 1,172)
Numbers = Annotated[list[Number], Field(max_length=MAX_OPEN_SET_INPUTS)]
Positive = Annotated[Number, _range(0, math.inf, low_open=True)]
Positives = Annotated[list[Positive], Field(max_length=MAX_OPEN_SET_INPUTS)]


class OpenSetHead(_Open):
    """A logistic regression over standardised inputs: not a digit where ``weights . x + bias > threshold``."""

    inputs: ShortText | None = None
    mean: Numbers
    scale: Positives
    weights: Numbers
    bias: Number
    threshold: Number
    number_threshold: Number | None = None  # for digits cut from a number: looser, see outliers.rejection

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenSetHead:
        if not len(self.mean) == len(self.scale) == len(self.weights):
            raise PydanticCustomError("open_set_head", "field 'open_set.head': expected mean, scale and weights "
                                      "of one length")
        return self


class OpenSetReasons(_Open):
    """A multinomial logistic regression naming why an input is not a digit: one row of weights per reason."""

    classes: Annotated[list[ShortText], Field(min_length=1, max_length=32)]
    mean: Numbers
    scale: Positives
    weights: Annotated[list[Numbers], Field(max_length=32)]
    bias: Annotated[list[Number], Field(max_length=32)]

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenSetReasons:
        if not (len(self.classes) == len(self.weights) == len(self.bias) and len(self.mean) == len(self.scale)
                and all(len(row) == len(self.mean) for row in self.weights)):
            raise PydanticCustomError("open_set_reasons", "field 'open_set.reasons': expected one row of weights "
                                      "and one bias per class, each row as long as mean and scale")
        return self


class OpenSet(_Open):
    """When an input is not a digit (``deepdigits.outliers``): cheap-check thresholds, a learned head, reasons."""

    version: Literal[1] = 1
    checks: Annotated[dict[ShortText, Number], Field(max_length=64)] | None = None
    head: OpenSetHead | None = None
    reasons: OpenSetReasons | None = None
    fit: dict[ShortText, Any] | None = None  # how it was fit and what it measured on held-out images


class BundleDocument(_Open):
    """``model.json``: what ``Classifier.metadata()`` writes, plus format, version and the weights' checksum."""

    format: Literal["deepdigits-bundle"]
    format_version: Literal[1]
    architecture: Name
    members: Annotated[list[Name], Field(min_length=2, max_length=MAX_MEMBERS)] | None = None
    member_metrics: Annotated[list[Fraction | None], Field(max_length=MAX_MEMBERS)] | None = None
    class_names: Annotated[list[ClassName], Field(min_length=2, max_length=MAX_CLASSES),
                           AfterValidator(_class_count)] | None = None
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    weights: Weights
    config: dict[ShortText, Any] | None = None
    dataset: DatasetInfo | None = None
    recipe: RecipeInfo | None = None
    history: Annotated[list[Annotated[dict[ShortText, Number], Field(max_length=64)]],
                       Field(max_length=MAX_EPOCHS)] = Field(default_factory=list)
    interrupted: bool = False
    train_seconds: NonNegative | None = None
    precision: ShortText | None = None
    metrics: Metrics | None = None
    calibration: Calibration | None = None  # absent or null: probabilities are softmax(logits), T = 1
    open_set: OpenSet | None = None  # absent: only the cheap not-a-digit checks, with their default thresholds
    versions: Annotated[dict[ShortText, ShortText], Field(max_length=32)] | None = None
    created: ShortText | None = None
    command: Annotated[str, Field(max_length=65536)] | None = None

    @model_validator(mode="after")
    def _ensemble_has_members(self) -> BundleDocument:
        if self.architecture == "ensemble" and not self.members:
            raise PydanticCustomError("ensemble_members",
                                      "field 'members': expected the architectures of the ensemble's members")
        return self


def validate_document(document: Any) -> dict:
    """The document checked and normalised (a plain dict; fields it lacks stay absent) or ``ValidationError``."""
    return BundleDocument.model_validate(document).model_dump(exclude_unset=True)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return f"a list of {_plural(len(value), 'item')}"
    if isinstance(value, dict):
        return f"an object of {_plural(len(value), 'field')}"
    if isinstance(value, str):
        return "a string " + _short(value, 40)
    return _short(value, 40)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _short(value: Any, limit: int) -> str:
    text = ascii(value) if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.replace("\n", " ")


def _field_path(loc: tuple) -> str:
    parts = []
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself, not its value"
            continue
        text = str(part)
        parts.append(text if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", text) else _short(text, 40))
    return ".".join(parts)


_PLAIN = {
    "missing": "missing (required)",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "model_attributes_type": "expected an object",
}


def error_line(error: ValidationError) -> str:
    """The first problem as ``field 'a.b': expected ..., got ...``: one line, at most a few hundred characters."""
    errors = error.errors(include_url=False)
    first = errors[0]
    kind, ctx, loc = first["type"], first.get("ctx") or {}, tuple(first["loc"])
    if not loc:  # a check of the whole document names its field in its message
        return _clip(first["msg"])
    if kind in _PLAIN:
        expected = _PLAIN[kind]
    elif kind in ("too_long", "too_short") and "actual_length" in ctx:
        bound = ctx.get("max_length", ctx.get("min_length"))
        unit = "fields" if ctx.get("field_type") == "Dictionary" else "items"
        expected = f"expected {'at most' if kind == 'too_long' else 'at least'} {bound} {unit}"
    elif kind in ("string_too_long", "string_too_short"):
        bound = ctx.get("max_length", ctx.get("min_length"))
        expected = f"expected {'at most' if kind == 'string_too_long' else 'at least'} {bound} characters"
    else:
        message = first["msg"]
        prefix = "Input should be "
        expected = "expected " + message[len(prefix):] if message.startswith(prefix) else message
    if kind == "missing":
        text = f"field '{_field_path(loc)}': {expected}"
    else:
        got = first.get("input")
        too_long_text = isinstance(got, str) and kind.startswith("string_too")
        got_text = _plural(len(got), "character") if too_long_text else _describe(got)
        text = f"field '{_field_path(loc)}': {expected}, got {got_text}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problems)"
    return _clip(text)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."
