"""Bundles an app can trust: every path in ``edgetl.json`` stays inside the bundle folder, and a bundle loaded with a
public key is refused, by name and before any model is opened, unless ``edgetl sign`` signed exactly that manifest
with the matching private key (the manifest's sha256 then vouch for every file).

The bundle is built by hand in milliseconds: a word-level tokenizer and a two-label ONNX graph with nothing to train
(the logits are minus and plus the sum of the token ids), laid out and listed as the bundle stage lays them out.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from edgetl.errors import ArtifactError, MissingDependencyError, SignatureError, UsageError

WORDS = ["[PAD]", "[UNK]", "a", "good", "film", "dull", "and", "lifeless"]


def _onnx_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["ids", "axis"], ["total"], keepdims=1),
             helper.make_node("Neg", ["total"], ["minus"]),
             helper.make_node("Concat", ["minus", "total"], ["logits"], axis=1)]
    graph = helper.make_graph(
        nodes, "sum-of-ids", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor("axis", TensorProto.INT64, [1], [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs: 'private'/'public' sign the bundle, 'other' is a public key of another pair."""
    from edgetl.cli import main

    folder = tmp_path_factory.mktemp("keys")
    assert main(["keygen", str(folder / "signer")]) == 0
    assert main(["keygen", str(folder / "stranger")]) == 0
    return {"private": folder / "signer", "public": folder / "signer.pub", "other": folder / "stranger.pub"}


@pytest.fixture(scope="module")
def signed_source(tmp_path_factory, keys) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from edgetl.artifact import file_table
    from edgetl.cli import main

    folder = tmp_path_factory.mktemp("bundle-source") / "bundle"
    (folder / "onnx").mkdir(parents=True)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    shutil.copy2(folder / "tokenizer.json", folder / "onnx" / "tokenizer.json")
    (folder / "onnx" / "config.json").write_text(json.dumps({"vocab_size": len(WORDS),
                                                             "id2label": {"0": "negative", "1": "positive"}}))
    _onnx_model(folder / "onnx" / "model.onnx")
    manifest = {"format": "edgetl-bundle", "format_version": 1, "task": "text-classification",
                "labels": ["negative", "positive"], "max_length": 16, "input_names": ["input_ids"],
                "models": {"onnx": {"path": "onnx/model.onnx", "precision": "fp32", "batch_invariant": True}},
                "files": file_table(folder)}
    (folder / "edgetl.json").write_text(json.dumps(manifest, indent=1))
    assert main(["sign", str(folder), "--key", str(keys["private"])]) == 0
    return folder


@pytest.fixture
def bundle(signed_source, tmp_path) -> Path:
    """A private copy of the signed bundle, for a test to alter."""
    return Path(shutil.copytree(signed_source, tmp_path / "bundle"))


@pytest.fixture
def no_model_opened(monkeypatch):
    """Fail the test if anything opens an ONNX Runtime session: refusals come before any model is opened."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("a model was opened before the bundle was refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _edit_manifest(bundle: Path, change) -> None:
    path = bundle / "edgetl.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _flip_bytes(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _model_outside(bundle: Path) -> None:
    """The model moved out of the folder (same bytes, so its sha256 still matches) and a symlink left in its place."""
    outside = bundle.parent / "outside.onnx"
    (bundle / "onnx" / "model.onnx").rename(outside)
    (bundle / "onnx" / "model.onnx").symlink_to(outside)


def _folder_outside(bundle: Path) -> None:
    """The whole model folder moved out of the bundle, a symlink to it left in its place."""
    (bundle / "onnx").rename(bundle.parent / "elsewhere")
    (bundle / "onnx").symlink_to(bundle.parent / "elsewhere")


# --- the positive path ---------------------------------------------------------------------------------------

def test_a_signed_bundle_loads_and_predicts_with_its_public_key(bundle, keys):
    from edgetl.runtime import TextClassifier, load

    assert (bundle / "edgetl.json.sig").stat().st_size == 64
    classifier = load(bundle, public_key=keys["public"])
    assert isinstance(classifier, TextClassifier)
    assert [p.label for p in classifier.predict(["good film", "a"])] == ["positive", "positive"]
    # The key may also be given as its PEM bytes (an app can embed it in code), and to a runtime class directly.
    same = TextClassifier.load(bundle, backend="onnxruntime", public_key=keys["public"].read_bytes())
    assert same.predict(["dull and lifeless"]) == classifier.predict(["dull and lifeless"])


def test_cli_predict_and_serve_take_a_public_key(bundle, keys, monkeypatch, capsys):
    from edgetl.cli import main
    from edgetl.runtime import server

    served = []
    monkeypatch.setattr(server, "serve", lambda runtime, *args, **kwargs: served.append(runtime))
    assert main(["predict", str(bundle), "good film", "--public-key", str(keys["public"])]) == 0
    assert capsys.readouterr().out.startswith("positive\t")
    assert main(["serve", str(bundle), "--public-key", str(keys["public"])]) == 0
    assert [r.labels for r in served] == [["negative", "positive"]]


# --- refusals under a public key -------------------------------------------------------------------------------

ALTERATIONS = {
    "edited model file": (lambda b: _flip_bytes(b / "onnx" / "model.onnx"), ArtifactError,
                          r"onnx/model\.onnx does not match its sha256 in edgetl\.json"),
    "edited tokenizer": (lambda b: (b / "tokenizer.json").write_text("{}"), ArtifactError,
                         r"tokenizer\.json does not match its sha256 in edgetl\.json"),
    "edited manifest": (lambda b: _edit_manifest(b, lambda m: m.update(labels=["positive", "negative"])), SignatureError,
                        r"edgetl\.json does not match its signature edgetl\.json\.sig under the given public key"),
    "manifest re-listing an edited file": (
        lambda b: (_flip_bytes(b / "onnx" / "model.onnx"), _edit_manifest(b, lambda m: m.update(files=_table(b)))),
        SignatureError, r"edgetl\.json does not match its signature edgetl\.json\.sig"),
    "missing signature": (lambda b: (b / "edgetl.json.sig").unlink(), SignatureError,
                          r"edgetl\.json is not signed \(no edgetl\.json\.sig\), and a public key was given"),
    "symlink out": (_model_outside, ArtifactError,
                    r"models\.onnx\.path 'onnx/model\.onnx' leads out of the folder through a symlink"),
}


def _table(bundle: Path) -> dict:
    from edgetl.artifact import file_table

    return file_table(bundle)


@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_an_altered_bundle_is_refused_by_name_before_any_model_opens(bundle, keys, no_model_opened, alteration):
    from edgetl.runtime import TextClassifier, load

    alter, error, message = ALTERATIONS[alteration]
    alter(bundle)
    with pytest.raises(error, match=message):
        load(bundle, public_key=keys["public"])
    with pytest.raises(error, match=message):
        TextClassifier.load(bundle, public_key=keys["public"])


def test_a_bundle_signed_with_another_key_is_refused(bundle, keys, no_model_opened):
    from edgetl.runtime import load

    with pytest.raises(SignatureError, match=r"does not match its signature .* the manifest was altered, or signed "
                                             r"with another key"):
        load(bundle, public_key=keys["other"])


def test_a_signed_manifest_must_list_every_file_the_runtime_reads(bundle, keys, no_model_opened):
    from edgetl.runtime import load
    from edgetl.runtime.bundle import sign_bundle

    _edit_manifest(bundle, lambda m: m["files"].pop("onnx/config.json"))
    sign_bundle(bundle, keys["private"])
    with pytest.raises(ArtifactError, match=r"onnx/config\.json is not listed in the signed edgetl\.json's files"):
        load(bundle, public_key=keys["public"])


def test_a_public_key_needs_the_checksums(bundle, keys, no_model_opened):
    from edgetl.runtime import load

    with pytest.raises(UsageError, match="public_key needs verify=True"):
        load(bundle, verify=False, public_key=keys["public"])


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_cli_refuses_an_unsigned_bundle_under_public_key(bundle, keys, no_model_opened, monkeypatch, capsys, command):
    from edgetl.cli import main
    from edgetl.runtime import server

    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: pytest.fail("served an unsigned bundle"))
    (bundle / "edgetl.json.sig").unlink()
    texts = ["good film"] if command == "predict" else []
    assert main([command, str(bundle), *texts, "--public-key", str(keys["public"])]) == 1
    assert "edgetl.json is not signed (no edgetl.json.sig)" in capsys.readouterr().err


def test_a_key_that_is_no_public_key_is_named(bundle, keys, tmp_path):
    from edgetl.runtime import load

    with pytest.raises(UsageError, match=rf"public key {re.escape(str(tmp_path / 'absent.pub'))}: file not found"):
        load(bundle, public_key=tmp_path / "absent.pub")
    with pytest.raises(UsageError, match=rf"public key {re.escape(str(keys['private']))}: not an unencrypted PEM"):
        load(bundle, public_key=keys["private"])


# --- paths confined to the folder, signed or not -------------------------------------------------------------

ESCAPES = {
    "model path with ..": (lambda m: m["models"]["onnx"].update(path="../outside/model.onnx"),
                           r"models\.onnx\.path '\.\./outside/model\.onnx' climbs out of the folder with '\.\.'"),
    "absolute model path": (lambda m: m["models"]["onnx"].update(path="/etc/passwd"),
                            r"models\.onnx\.path '/etc/passwd' is absolute"),
    "windows separators": (lambda m: m["models"]["onnx"].update(path="onnx\\..\\..\\model.onnx"),
                           r"models\.onnx\.path .* climbs out of the folder"),
    "listed file with ..": (lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}),
                            r"files entry '\.\./\.\./etc/passwd' climbs out of the folder"),
    "path that is no string": (lambda m: m["models"]["onnx"].update(path=["onnx", "model.onnx"]),
                               r"models\.onnx\.path \['onnx', 'model\.onnx'\] is not a relative path"),
}


@pytest.mark.parametrize("escape", list(ESCAPES))
def test_a_manifest_path_out_of_the_folder_is_refused_without_any_key(bundle, no_model_opened, escape):
    from edgetl.runtime import TextClassifier, load

    change, message = ESCAPES[escape]
    _edit_manifest(bundle, change)
    with pytest.raises(ArtifactError, match=message):
        load(bundle)
    with pytest.raises(ArtifactError, match=message):
        TextClassifier.load(bundle, verify=False)


@pytest.mark.parametrize("move", [_model_outside, _folder_outside], ids=["model file", "model folder"])
def test_a_symlink_out_of_the_folder_is_refused_though_its_sha256_matches(bundle, no_model_opened, move):
    from edgetl.runtime import load

    move(bundle)
    with pytest.raises(ArtifactError, match=r"models\.onnx\.path 'onnx/model\.onnx' leads out of the folder through "
                                            r"a symlink \(to .*(outside|elsewhere)"):
        load(bundle)


def test_an_unlisted_tokenizer_that_is_a_symlink_out_is_refused(bundle, no_model_opened):
    from edgetl.runtime import load

    outside = bundle.parent / "tokenizer.json"
    (bundle / "tokenizer.json").rename(outside)
    (bundle / "tokenizer.json").symlink_to(outside)
    _edit_manifest(bundle, lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(ArtifactError, match=r"tokenizer\.json leads out of the folder through a symlink"):
        load(bundle)


def test_a_symlink_that_stays_inside_is_accepted(bundle, keys):
    from edgetl.runtime import load

    copy = bundle / "onnx" / "tokenizer.json"
    copy.unlink()
    copy.symlink_to(bundle / "tokenizer.json")
    assert load(bundle, public_key=keys["public"]).predict(["good film"])[0].label == "positive"


# --- keygen and sign -------------------------------------------------------------------------------------------

def test_sign_refuses_a_damaged_bundle_and_writes_no_signature(bundle, keys, capsys):
    from edgetl.cli import main

    (bundle / "edgetl.json.sig").unlink()
    _flip_bytes(bundle / "onnx" / "model.onnx")
    assert main(["sign", str(bundle), "--key", str(keys["private"])]) == 1
    assert "onnx/model.onnx does not match its sha256" in capsys.readouterr().err
    assert sorted(p.name for p in bundle.iterdir()) == ["edgetl.json", "onnx", "tokenizer.json"]


def test_sign_names_a_key_that_is_no_private_key(bundle, keys, capsys):
    from edgetl.cli import main

    before = (bundle / "edgetl.json.sig").read_bytes()
    assert main(["sign", str(bundle), "--key", str(keys["public"])]) == 2
    assert f"private key {keys['public']}: not an unencrypted PEM private key" in capsys.readouterr().err
    assert (bundle / "edgetl.json.sig").read_bytes() == before


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    from edgetl.cli import main

    assert main(["keygen", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    assert b"BEGIN PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    private = (tmp_path / "k").read_bytes()
    assert main(["keygen", str(tmp_path / "k")]) == 2
    assert f"keygen: {tmp_path / 'k'} exists; edgetl never overwrites a key" in capsys.readouterr().err
    assert (tmp_path / "k").read_bytes() == private
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]  # no temp files left behind


# --- cryptography: declared, and imported only when a key is used ---------------------------------------------

def test_cryptography_is_imported_only_when_a_key_is_used(signed_source, keys, tmp_path):
    code = ("import sys; from edgetl.runtime import load; load(sys.argv[1]).predict(['good film']); "
            "assert 'cryptography' not in sys.modules; load(sys.argv[1], public_key=sys.argv[2]); "
            "assert 'cryptography' in sys.modules; assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code, str(signed_source), str(keys["public"])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


def test_without_cryptography_a_key_asks_for_the_sign_extra(signed_source, keys, monkeypatch):
    from edgetl.runtime import load

    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgetl\[sign\]'"):
        load(signed_source, public_key=keys["public"])
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("cryptography") for r in extras["sign"])
    assert "sign" in extras["dev"][0]
