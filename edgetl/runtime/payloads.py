"""JSON inputs of a bundle runtime: ``edgetl serve``'s POST /predict, /embed and /generate bodies (the routes are in ``server``'s
docstring) and the pair form that ``edgetl predict --input`` rows share. A body is checked whole before anything is
queued, so one malformed request never fails the batch it would have joined."""

from __future__ import annotations

import json


class RequestError(Exception):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def pair_from_json(value) -> tuple[str, str] | None:
    """A (text, text_pair) pair from JSON, {"text": string, "text_pair": string} or [string, string]; None otherwise."""
    if isinstance(value, dict) and "text" in value and "text_pair" in value:
        value = [value["text"], value["text_pair"]]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(t, str) for t in value):
        return value[0], value[1]
    return None


def _json_kind(value) -> str:
    return f"an object with keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__


def _expected(text_pair: bool, takes_words: bool) -> str:
    if text_pair:
        return ('expected a JSON object with either "text": string and "text_pair": string, or "texts": '
                '[{"text": string, "text_pair": string}, ...]')
    if takes_words:
        return ('expected a JSON object with one of "text": string, "texts": [string, ...], "words": [string, ...] '
                'or "sentences": [[string, ...], ...]')
    return 'expected a JSON object with either "text": string or "texts": [string, ...]'


def _one_text(payload: dict, text_pair: bool):
    if not isinstance(payload["text"], str):
        raise RequestError(422, f'"text" must be a string, not {type(payload["text"]).__name__}')
    if not text_pair:
        if "text_pair" in payload:
            raise RequestError(422, '"text_pair" was given, but this bundle\'s model reads single texts: send "text" alone')
        return payload["text"]
    if "text_pair" not in payload:
        raise RequestError(422, '"text_pair" is missing: this bundle\'s model reads (text, text_pair) pairs')
    if not isinstance(payload["text_pair"], str):
        raise RequestError(422, f'"text_pair" must be a string, not {type(payload["text_pair"]).__name__}')
    return payload["text"], payload["text_pair"]


def _text_of(value, where: str, text_pair: bool):
    if text_pair:
        pair = pair_from_json(value)
        if pair is None:
            raise RequestError(422, f'{where} must be {{"text": string, "text_pair": string}} or [string, string], '
                                    f'not {_json_kind(value)}')
        return pair
    if not isinstance(value, str):
        raise RequestError(422, f"{where} must be a string, not {type(value).__name__}")
    return value


def _words_of(value, where: str) -> list[str]:
    if not isinstance(value, list):
        raise RequestError(422, f"{where} must be a list of strings (words), not {type(value).__name__}")
    for index, word in enumerate(value):
        if not isinstance(word, str):
            raise RequestError(422, f"{where}[{index}] must be a string, not {type(word).__name__}")
    return value


# /generate's fields besides "prompt" and "stream": GenerationSettings' fields and the JSON types each takes.
GENERATE_FIELDS = {"max_new_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
                   "seed": (int,), "stop": (list,)}


def _json_body(body: bytes):
    try:
        return json.loads(body.decode("utf-8"))  # decoded here: json.loads(bytes) would guess UTF-16/32 too
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def parse_generate_request(body: bytes) -> tuple[str, dict, bool]:
    """A /generate body: the prompt, the GenerationSettings keywords it sets, and whether to stream.

    ``{"prompt": string, "max_new_tokens": int, "temperature": number, "top_k": int, "top_p": number, "seed": int,
    "stop": [string, ...], "stream": bool}``, every field but ``prompt`` optional; a field of the wrong type, or one
    not listed, is 422 naming it.
    """
    payload = _json_body(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str):
        raise RequestError(422, 'expected a JSON object with "prompt": string (and optionally '
                                f'{", ".join(GENERATE_FIELDS)}, "stream")')
    unknown = sorted(set(payload) - {"prompt", "stream", *GENERATE_FIELDS})
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; known: prompt, stream, {', '.join(GENERATE_FIELDS)}")
    if not isinstance(payload.get("stream", False), bool):
        raise RequestError(422, '"stream" must be true or false')
    options = {}
    for field, types in GENERATE_FIELDS.items():
        if field in payload and payload[field] is not None:
            value = payload[field]
            if isinstance(value, bool) or not isinstance(value, types):
                raise RequestError(422, f'"{field}" must be {" or ".join(t.__name__ for t in types)}, not '
                                        f"{_json_kind(value)}")
            options[field] = tuple(value) if field == "stop" else value
    return payload["prompt"], options, payload.get("stream", False)


def parse_predict_request(body: bytes, max_texts: int, text_pair: bool = False,
                          takes_words: bool = False) -> tuple[str, list, bool]:
    """The runtime method for a /predict body (``predict``, or ``predict_words`` for words), its inputs, and whether
    the body asked for one (``text``, ``words``) or many (``texts``, ``sentences``).

    ``text_pair``: inputs are (text, text_pair) pairs; ``takes_words``: pre-split words are accepted too.
    """
    payload = _json_body(body)
    keys = ("text", "texts", "words", "sentences") if takes_words else ("text", "texts")
    given = [key for key in keys if isinstance(payload, dict) and key in payload]
    if len(given) != 1:
        raise RequestError(422, _expected(text_pair, takes_words))
    key = given[0]
    if key == "text":
        return "predict", [_one_text(payload, text_pair)], True
    if key == "words":
        return "predict_words", [_words_of(payload["words"], '"words"')], True
    items = payload[key]
    if not isinstance(items, list):
        what = "lists of words" if key == "sentences" else "pairs" if text_pair else "strings"
        raise RequestError(422, f'"{key}" must be a list of {what}, not {type(items).__name__}')
    if len(items) > max_texts:
        raise RequestError(413, f'"{key}" has {len(items)} items, over the limit of {max_texts} per request')
    if key == "sentences":
        return "predict_words", [_words_of(words, f'"sentences"[{i}]') for i, words in enumerate(items)], False
    return "predict", [_text_of(item, f'"texts"[{i}]', text_pair) for i, item in enumerate(items)], False
