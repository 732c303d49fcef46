"""The description library (mwm.localize.prompt_library), its LLM hook against a local stub, and `mwm prompts`."""

from __future__ import annotations

import fnmatch
import json
import socket
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mwm.cli import app
from mwm.errors import MWMError
from mwm.localize import prompt_library as pl
from mwm.localize.prompt_library import (LLM_PROMPT_TEMPLATE, PromptEntry, generate_descriptions, get_entry,
                                         list_entries, load_library, parse_sentences)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {("brain_mri", "tumor"), ("brain_mri", "edema"), ("chest_xray", "lungs"), ("chest_xray", "pneumonia"),
           ("chest_xray", "cardiomegaly"), ("chest_ct", "lungs"), ("chest_ct", "nodule"), ("chest_ct", "tumor"),
           ("phantom", "lesion"), ("phantom", "bright_lesion"), ("phantom", "dark_lesion")}

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------- the packaged library


def test_every_shipped_entry_is_complete():
    entries = list_entries()
    assert {(e.modality, e.target) for e in entries} == SHIPPED
    for e in entries:
        assert isinstance(e, PromptEntry) and e.short
        assert 3 <= len(e.descriptions) <= 5, e.target
        assert len(e.synonyms) >= 2 and len(e.lay) >= 1, e.target
        for d in e.descriptions:
            # fits a CLIP text context (77 tokens) with room to spare
            assert 3 <= len(d.split()) <= 30, d
        # ';' separates the members of a prompt ensemble (`mwm localize --prompt "a;b;c"`)
        assert not any(";" in p for p in e.family()), e.target


def test_packaged_yaml_ships_with_the_wheel():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mwm"]
    assert any(fnmatch.fnmatch("localize/prompt_library.yaml", p) for p in patterns), patterns
    assert (REPO / "src/mwm/localize/prompt_library.yaml").is_file()


@pytest.mark.parametrize("modality,target,want", [
    ("brain-mri", "tumour", ("brain_mri", "tumor")),
    ("MRI-Brain", "Oedema", ("brain_mri", "edema")),
    ("cxr", "LUNGS", ("chest_xray", "lungs")),
    ("Chest X-ray", "enlarged heart", ("chest_xray", "cardiomegaly")),
    ("chest-xray", "pneumonia", ("chest_xray", "pneumonia")),
    ("chest_ct", "Pulmonary Nodule", ("chest_ct", "nodule")),
    ("CT", "tumor", ("chest_ct", "tumor")),
    ("phantoms", "bright lesion", ("phantom", "bright_lesion")),
    ("phantom", "Dark", ("phantom", "dark_lesion")),
])
def test_aliases_resolve(modality, target, want):
    e = get_entry(modality, target)
    assert (e.modality, e.target) == want


def test_unknown_names_list_what_exists_and_suggest():
    with pytest.raises(MWMError, match="did you mean 'brain_mri'") as ei:
        get_entry("brian-mri", "tumor")
    assert "chest_xray" in str(ei.value) and "phantom" in str(ei.value)
    with pytest.raises(MWMError, match="did you mean 'tumor'") as ei:
        get_entry("brain_mri", "tumr")
    assert "Targets for brain_mri: tumor, edema" in str(ei.value)
    with pytest.raises(MWMError, match="exists for chest_ct"):
        get_entry("brain_mri", "nodule")


def test_family_and_copies():
    e = get_entry("brain_mri", "tumor")
    assert e.family("short") == ["brain tumor"]
    assert e.family("synonyms") == e.synonyms and "glioma" in e.synonyms and "intracranial mass" in e.synonyms
    everything = e.family()
    assert everything[0] == e.short and len(everything) == len(set(everything))
    assert set(everything) == {e.short, *e.synonyms, *e.lay, *e.descriptions}
    with pytest.raises(MWMError, match="unknown prompt family"):
        e.family("noise")  # type: ignore[arg-type]
    with pytest.raises(Exception):
        e.short = "x"  # frozen
    e.synonyms.append("changed by a caller")
    assert "changed by a caller" not in get_entry("brain_mri", "tumor").synonyms


# ----------------------------------------------------------------------------- user libraries


def test_user_yaml_merges_over_the_packaged_one(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(yaml.safe_dump({
        "modalities": {"knee_mri": {"name": "knee MRI", "aliases": ["mri-knee"]}},
        "entries": {
            "brain-mri": {"tumour": {"descriptions": ["my sentence one", "my sentence two"]}},  # keyed by aliases
            "knee_mri": {"meniscal_tear": {"short": "meniscal tear", "synonyms": ["torn meniscus"],
                                           "aliases": ["tear"]}},
        }}))
    lib = load_library(user)
    e = lib.get_entry("brain_mri", "tumor")
    assert e.descriptions == ["my sentence one", "my sentence two"]
    assert e.short == "brain tumor" and "glioma" in e.synonyms  # fields the user left out keep packaged values
    k = lib.get_entry("MRI-Knee", "tear")
    assert (k.modality, k.target, k.short) == ("knee_mri", "meniscal_tear", "meniscal tear")
    assert len(lib.list_entries()) == len(SHIPPED) + 1 and lib.sources[-1] == str(user)
    assert get_entry("brain_mri", "tumor").descriptions != e.descriptions  # the packaged default is untouched


@pytest.mark.parametrize("content,expect", [
    ("entries: [unclosed\n", "not valid YAML at line"),
    ("- a\n- b\n", "must be a mapping"),
    ("entries:\n  brain_mri:\n    tumor:\n      descriptions: just one string\n",
     "entry brain_mri/tumor: descriptions"),
    ("entries:\n  brain_mri:\n    tumor:\n      descriptionz: [a]\n", "entry brain_mri/tumor: descriptionz"),
    ("entries:\n  knee_mri:\n    tear:\n      descriptions: [a torn meniscus]\n", "entry knee_mri/tear: short"),
    ("entries:\n  brain_mri:\n    tumor:\n      synonyms: [glioma, '  ']\n", "entry brain_mri/tumor: synonyms"),
    ("entries:\n  brain_mri:\n    mass:\n      short: mass\n      aliases: [tumour]\n", "used by both"),
])
def test_bad_user_yaml_names_the_file_and_entry(tmp_path, content, expect):
    bad = tmp_path / "bad_prompts.yaml"
    bad.write_text(content)
    with pytest.raises(MWMError, match=expect) as ei:
        load_library(bad)
    assert "bad_prompts.yaml" in str(ei.value)


def test_missing_user_file(tmp_path):
    with pytest.raises(MWMError, match="not found"):
        load_library(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- LLM generation (local stub)


class _Stub:
    """An OpenAI-compatible /chat/completions stub on 127.0.0.1; records requests, answers ``reply``."""

    def __init__(self):
        self.requests: list[dict] = []
        self.reply: tuple[int, str] = (200, "{}")
        self.delay = 0.0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                time.sleep(stub.delay)
                status, text = stub.reply
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def answer(self, content: str, rid: str = "chatcmpl-stub-1") -> None:
        self.reply = (200, json.dumps({"id": rid, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}))


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


LLM_ANSWER = ("Here are the typical characteristics:\n\n"
              "1. A focal mass with mixed signal.\n"
              "2. **Margins:** irregular, lobulated borders.\n"
              "3) A bright enhancing rim around a dark core.\n"
              "- Surrounding edema on FLAIR.\n"
              "- A fifth line that n=4 drops.\n\n"
              "These features help radiologists.")


def test_generate_posts_the_template_and_parses_the_list(stub):
    stub.answer(LLM_ANSWER, rid="chatcmpl-abc")
    sentences, meta = generate_descriptions("mri-brain", "tumour", url=stub.url, model="tiny-llm", n=4,
                                            api_key="sk-test", timeout=5)
    assert sentences == ["A focal mass with mixed signal.", "irregular, lobulated borders.",
                         "A bright enhancing rim around a dark core.", "Surrounding edema on FLAIR."]
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["model"] == "tiny-llm"
    user = [m["content"] for m in req["body"]["messages"] if m["role"] == "user"]
    filled = LLM_PROMPT_TEMPLATE.format(target="tumor", modality="brain MRI")
    assert filled == "Describe the typical visual characteristics of a tumor in a brain MRI image"
    assert user == [filled + "."]
    assert meta["template"] == LLM_PROMPT_TEMPLATE and meta["prompt"] == filled
    assert (meta["url"], meta["model"], meta["response_id"], meta["n"]) == (stub.url, "tiny-llm", "chatcmpl-abc", 4)
    assert "sk-test" not in json.dumps(meta)


def test_parse_sentences_without_markers_splits_the_paragraph():
    assert parse_sentences("A round mass. It is bright! Borders are sharp?") == [
        "A round mass.", "It is bright!", "Borders are sharp?"]
    assert parse_sentences("Intro:\n* one thing\n* one thing\n• two things\n(3) three things", n=None) == [
        "one thing", "two things", "three things"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_errors_name_the_url_and_what_to_check(stub):
    kw = dict(model="m", timeout=5)
    stub.reply = (500, '{"error": "model not loaded"}')
    with pytest.raises(MWMError, match=r"answered HTTP 500.*model not loaded.*--llm-model") as ei:
        generate_descriptions("cxr", "lungs", url=stub.url, **kw)
    assert f"{stub.url}/chat/completions" in str(ei.value)
    stub.reply = (200, "<html>not json</html>")
    with pytest.raises(MWMError, match="malformed JSON.*OpenAI-compatible") as ei:
        generate_descriptions("cxr", "lungs", url=stub.url, **kw)
    assert stub.url in str(ei.value)
    stub.reply = (200, '{"id": "x", "choices": []}')
    with pytest.raises(MWMError, match=r"without choices\[0\]\.message\.content"):
        generate_descriptions("cxr", "lungs", url=stub.url, **kw)
    stub.answer("   \n  ")
    with pytest.raises(MWMError, match="no usable sentences"):
        generate_descriptions("cxr", "lungs", url=stub.url, **kw)
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(MWMError, match="cannot reach LLM endpoint .*server is running") as ei:
        generate_descriptions("cxr", "lungs", url=dead, **kw)
    assert dead in str(ei.value)
    with pytest.raises(MWMError, match="not an http"):
        generate_descriptions("cxr", "lungs", url="localhost:8000", **kw)
    stub.answer("1. late")
    stub.delay = 1.0
    with pytest.raises(MWMError, match="did not answer within 0.3 s"):
        generate_descriptions("cxr", "lungs", url=stub.url, model="m", timeout=0.3)
    stub.delay = 0.0
    n_before = len(stub.requests)
    for url, model in [(None, "m"), (stub.url, None), ("", "")]:
        with pytest.raises(MWMError, match="nothing was sent"):
            generate_descriptions("cxr", "lungs", url=url, model=model)  # type: ignore[arg-type]
    assert len(stub.requests) == n_before


# ----------------------------------------------------------------------------- the CLI


def test_cli_list_and_show(tmp_path):
    r = run("prompts", "list")
    assert r.exit_code == 0, r.output
    for word in ("brain_mri", "cardiomegaly", "bright_lesion", "#descriptions"):
        assert word in r.stdout
    r = run("prompts", "list", "--json")
    assert len(json.loads(r.stdout)) == len(SHIPPED)
    r = run("prompts", "show", "brain-mri", "tumour", "--kind", "synonyms")
    assert r.exit_code == 0 and r.stdout.splitlines() == get_entry("brain_mri", "tumor").synonyms
    r = run("prompts", "show", "cxr", "pneumonia", "--json")
    doc = json.loads(r.stdout)
    assert doc["target"] == "pneumonia" and doc["prompts"][0] == doc["short"] and len(doc["descriptions"]) >= 3
    r = run("prompts", "show", "cxr", "pneumonia")
    assert r.exit_code == 0 and "descriptions (4)" in r.stdout and "air bronchograms" in r.stdout
    r = run("prompts", "show", "brain_mri", "tumr")
    assert r.exit_code == 2 and "error: no target 'tumr'" in r.output and "did you mean 'tumor'" in r.output
    assert "Traceback" not in r.output
    r = run("prompts", "show", "brain_mri", "tumor", "--kind", "noise")
    assert r.exit_code == 2 and "--kind 'noise'" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: {brain_mri: {tumor: {descriptions: 3}}}\n")
    r = run("prompts", "list", "--library", bad)
    assert r.exit_code == 2 and str(bad) in r.output and "entry brain_mri/tumor: descriptions" in r.output


def test_cli_generate_writes_a_loadable_user_library(stub, tmp_path):
    out = tmp_path / "lib" / "mine.yaml"
    r = run("prompts", "generate", "brain-mri", "tumour")
    assert r.exit_code == 2 and "--llm-url" in r.output and "nothing was sent" in r.output and not stub.requests
    stub.answer(LLM_ANSWER, rid="chatcmpl-1")
    r = run("prompts", "generate", "brain-mri", "tumour", "--llm-url", stub.url, "--llm-model", "tiny-llm",
            "--n", 3, "--out", out)
    assert r.exit_code == 0, r.output
    stub.answer("1. A dark tear line through the meniscus.\n2. Abnormal signal reaching the joint surface.",
                rid="chatcmpl-2")
    r = run("prompts", "generate", "knee MRI", "meniscal tear", "--llm-url", stub.url, "--llm-model", "tiny-llm",
            "--out", out)
    assert r.exit_code == 0, r.output
    assert [p.name for p in out.parent.iterdir()] == ["mine.yaml"]  # atomic write: no temp file left behind
    assert "Describe the typical visual characteristics of a meniscal tear in a knee MRI image" in \
        stub.requests[-1]["body"]["messages"][-1]["content"]

    lib = load_library(out)
    tumor = lib.get_entry("brain_mri", "tumor")
    assert tumor.descriptions == ["A focal mass with mixed signal.", "irregular, lobulated borders.",
                                  "A bright enhancing rim around a dark core."]
    assert tumor.short == "brain tumor"  # packaged fields kept: the file stores only what was generated
    assert tumor.meta["template"] == LLM_PROMPT_TEMPLATE and tumor.meta["url"] == stub.url
    assert (tumor.meta["model"], tumor.meta["response_id"]) == ("tiny-llm", "chatcmpl-1")
    knee = lib.get_entry("knee-mri", "meniscal tear")
    assert knee.short == "meniscal tear" and len(knee.descriptions) == 2
    assert knee.meta["response_id"] == "chatcmpl-2"

    r = run("prompts", "show", "brain_mri", "tumor", "--library", out, "--kind", "descriptions")
    assert r.stdout.splitlines() == tumor.descriptions


def test_cli_generate_without_out_prints_yaml(stub):
    stub.answer("- A white patch in the lung.\n- Blurred heart border.")
    r = run("prompts", "generate", "cxr", "pneumonia", "--llm-url", stub.url + "/", "--llm-model", "m")
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.stdout)
    assert doc["descriptions"] == ["A white patch in the lung.", "Blurred heart border."]
    assert doc["meta"]["prompt"] == LLM_PROMPT_TEMPLATE.format(target="pneumonia", modality="chest X-ray")
    assert stub.requests[-1]["path"] == "/v1/chat/completions"


def test_module_constant_is_the_papers_question():
    assert pl.LLM_PROMPT_TEMPLATE.format(target="[category]", modality="[modality]") == \
        "Describe the typical visual characteristics of a [category] in a [modality] image"
