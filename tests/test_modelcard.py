"""Model cards on every export, and ``--push-to-hub`` tested up to the network (the test machines are offline).

The card is checked the way the Hub reads it (``huggingface_hub.ModelCard.load``). Pushing is tested against a local
HTTP server standing in for the Hub, or a closed port, and with ``HfApi.upload_folder`` replaced by a recorder.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from diffmem.cli import main
from diffmem.edits import MANIFEST_NAME, Mask, WeightDelta, export_edited
from diffmem.errors import ConfigError, DiffmemError, PushError
from diffmem.modelcard import hub_model_id, push_to_hub, render_results, write_model_card
from diffmem.targets import find_targets

RESULTS = [{"setting": "unedited", "replication": 0.75, "clip_score": 31.25},
           {"setting": "edited", "replication": 0.0, "clip_score": 30.5, "note": "a|b"}]


@pytest.fixture(scope="module")
def mask(tiny_pipe) -> Mask:
    g = torch.Generator().manual_seed(0)
    layers = {name: torch.rand(lin.weight.shape, generator=g) < 0.2
              for name, lin in find_targets(tiny_pipe.unet).items()}
    return Mask(layers, meta={"method": "wanda", "config": {"ratio": 0.2}})


@pytest.fixture(scope="module")
def model_dir(tiny_pipe, tmp_path_factory) -> Path:
    """The tiny pipeline saved to disk, declaring sampler settings in ``diffmem_defaults.json``."""
    path = tmp_path_factory.mktemp("card") / "tiny-sd"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    (path / "diffmem_defaults.json").write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 5.0}))
    return path


def test_export_carries_a_card_the_hub_reads(tiny_pipe, mask, tmp_path):
    out = export_edited(tiny_pipe, mask, tmp_path / "pruned", source="CompVis/stable-diffusion-v1-4", results=RESULTS)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4"
    assert "diffmem" in card.data.tags and {"memorization-mitigation", "text-to-image"} <= set(card.data.tags)
    body = card.content.split("\n---\n", 1)[1]
    assert "| Kind | mask:" in body and f"{mask.num_masked():,} of {mask.num_total():,}" in body
    assert f"{100 * mask.fraction():.4g} % of the denoiser" in body and "wanda (ratio 0.2)" in body
    assert mask.sha256() in body
    assert "| setting | replication | clip_score | note |" in body and "| edited | 0 | 30.5 | a\\|b |" in body
    assert "## Sampler settings" not in body  # the source declares none
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # written inside the atomic export


def test_local_source_is_not_published_and_sampler_settings_are_listed(model_dir, mask, tmp_path):
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(model_dir))
    out = export_edited(loaded, mask, tmp_path / "pruned")  # the source is the pipeline's own (local) path
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and "diffmem" in card.data.tags
    assert str(model_dir.parent) not in card.content and "`tiny-sd`" in card.content
    assert "| `num_inference_steps` | 3 |" in card.content and "| `guidance_scale` | 5 |" in card.content
    assert 'pipe("a prompt", guidance_scale=5.0, num_inference_steps=3)' in card.content
    assert "## Measured results" not in card.content
    assert json.loads((out / MANIFEST_NAME).read_text())["carried_sidecars"] == ["diffmem_defaults.json"]


def test_bare_denoiser_and_unedited_exports_have_cards(tiny_pipe, tmp_path):
    out = export_edited(tiny_pipe.unet, None, tmp_path / "unet", settings={"sampler": {"guidance_scale": 2.0}})
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "diffmem" in card.data.tags
    assert card.data.pipeline_tag is None and "text-to-image" not in card.data.tags  # a denoiser alone
    assert "unchanged" in card.content and "| `guidance_scale` | 2 |" in card.content
    assert "from_pretrained(" not in card.content.split("## Sampler settings")[1]


def test_a_failed_card_leaves_no_export(tiny_pipe, mask, tmp_path, monkeypatch):
    import diffmem.edits.export

    def broken(*args, **kwargs):
        raise RuntimeError("card writer broke")

    monkeypatch.setattr(diffmem.edits.export, "write_model_card", broken)
    with pytest.raises(RuntimeError, match="card writer broke"):
        export_edited(tiny_pipe, mask, tmp_path / "pruned")
    assert list(tmp_path.iterdir()) == []


def test_write_model_card_on_its_own(mask, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    path = write_model_card(tmp_path, mask, base_model="someone/model", sampler={"num_inference_steps": 20},
                            results="| a | b |\n|---|---|\n| 1 | 2 |")
    card = ModelCard.load(path)
    assert path == tmp_path / "README.md" and card.data.base_model == "someone/model"
    assert "| a | b |\n|---|---|\n| 1 | 2 |" in card.content and "| `num_inference_steps` | 20 |" in card.content


def test_a_mitigated_edit_names_every_step_that_made_it(mask, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    delta = WeightDelta({}, meta={"method": "repair", "strength": 0.1,
                                  "mitigation": {"method": "wanda", "robust": "prune", "redirect": 10.0,
                                                 "repair_steps": 100}})
    card = ModelCard.load(write_model_card(tmp_path, delta, base_model="someone/model"))
    assert ("| Made by | diffmem mitigate: wanda at strength 0.1, then robust prune rounds, then redirect of the "
            "memorized prompts (λ = 10), then repair toward the unedited model (100 steps) |") in card.content
    assert "Located with" not in card.content
    plain = ModelCard.load(write_model_card(tmp_path, mask, base_model="someone/model"))
    assert "| Located with | wanda (ratio 0.2) |" in plain.content and "Made by" not in plain.content


def test_render_results():
    table = render_results([{"a": 1, "b": None}, {"b": True, "c": 0.123456}])
    assert table == "| a | b | c |\n|---|---|---|\n| 1 | n/a | n/a |\n| n/a | yes | 0.1235 |\n"
    assert render_results([]) == ""


def test_hub_model_id(tmp_path, monkeypatch):
    assert hub_model_id("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    snapshot = tmp_path / "hub" / "models--CompVis--stable-diffusion-v1-4" / "snapshots" / "abc123"
    assert hub_model_id(snapshot) == "CompVis/stable-diffusion-v1-4"
    assert hub_model_id(tmp_path) is None  # a local folder
    assert hub_model_id("org/name") == "org/name"
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_model_id("org/name") is None  # a local folder that happens to look like a repo id
    assert hub_model_id("not a repo id!") is None and hub_model_id(None) is None


# -- pushing ---------------------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []


@pytest.fixture
def recorded(monkeypatch) -> _Recorder:
    """``HfApi.create_repo`` and ``upload_folder`` replaced by a recorder that checks what would be uploaded."""
    rec = _Recorder()

    def create_repo(self, repo_id, **kwargs):
        rec.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        rec.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder, **kwargs,
                                            "files": sorted(p.name for p in folder.iterdir())}))
        return type("CommitInfo", (), {"commit_url": f"https://hub.test/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return rec


def test_push_to_hub_uploads_the_export(tiny_pipe, mask, tmp_path, recorded):
    out = export_edited(tiny_pipe, mask, tmp_path / "pruned")
    url = push_to_hub(out, "someone/tiny-mitigated", token="hf_test", private=True)
    assert url == "https://hub.test/someone/tiny-mitigated/commit/1"
    (name, create), (name2, upload) = recorded.calls
    assert name == "create_repo" and create["repo_id"] == "someone/tiny-mitigated"
    assert create["exist_ok"] is True and create["private"] is True and create["token"] == "hf_test"
    assert name2 == "upload_folder" and upload["repo_id"] == "someone/tiny-mitigated" and upload["folder_path"] == out
    assert {"README.md", "model_index.json", MANIFEST_NAME, "unet"} <= set(upload["files"])


def test_push_to_hub_refuses_a_bad_repo_id_before_any_request(tmp_path, recorded):
    with pytest.raises(ConfigError, match="repo_id"):
        push_to_hub(tmp_path, "not a repo id!")
    assert recorded.calls == []


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Records every request and answers 503, like a Hub that is down."""

    requests: list[tuple[str, str]] = []

    def _answer(self) -> None:
        type(self).requests.append((self.command, self.path))
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        body = b'{"error": "service unavailable"}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub endpoint pointed at a local server that records requests (the token is a dummy)."""
    import huggingface_hub.constants

    _FakeHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield _FakeHub
    server.shutdown()
    server.server_close()


@pytest.fixture
def mask_file(mask, tmp_path) -> Path:
    return mask.save(tmp_path / "mask")


def _messages(err: str) -> list[str]:
    """The lines of stderr without the progress bars of loading and saving (``\r``-updated)."""
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    return [line for line in lines if line.strip() and "it/s]" not in line]


def _assert_complete_export(out: Path) -> None:
    from diffusers import StableDiffusionPipeline

    assert {"README.md", "model_index.json", MANIFEST_NAME, "diffmem_defaults.json"} <= {p.name for p in out.iterdir()}
    assert ModelCard.load(out / "README.md").data.library_name == "diffusers"
    StableDiffusionPipeline.from_pretrained(str(out))


def test_prune_push_failure_is_one_line_after_a_complete_export(model_dir, mask_file, tmp_path, fake_hub, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", str(model_dir), "--edit", str(mask_file), "--out", str(out),
                 "--push-to-hub", "someone/tiny-mitigated"])
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = _messages(err)
    assert line.startswith("diffmem: error: could not push to someone/tiny-mitigated: ")
    assert "Traceback" not in err and line.endswith(f"hf upload someone/tiny-mitigated {out})")
    assert ("POST", "/api/repos/create") in fake_hub.requests  # it got as far as asking the Hub
    _assert_complete_export(out)


def test_prune_push_without_network(model_dir, mask_file, tmp_path, monkeypatch, capsys):
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    out = tmp_path / "pruned"
    code = main(["prune", str(model_dir), "--edit", str(mask_file), "--out", str(out), "--push-to-hub", "a/b"])
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = _messages(err)
    assert line.startswith("diffmem: error: could not push to a/b: ") and "Traceback" not in err
    _assert_complete_export(out)


def test_prune_pushes_the_export(model_dir, mask_file, tmp_path, recorded):
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--edit", str(mask_file), "--out", str(out), "--push-to-hub", "a/b"]) == 0
    assert [(n, c["repo_id"]) for n, c in recorded.calls] == [("create_repo", "a/b"), ("upload_folder", "a/b")]
    assert recorded.calls[1][1]["folder_path"] == out


def test_bad_repo_id_is_refused_before_the_model_loads(model_dir, mask_file, tmp_path, capsys, monkeypatch):
    import importlib

    # modules that bind load_pipeline at import: imported first (with the real function), each patched for this test
    # only; a module first imported under the patch would keep the fake for every later test in this process
    modules = [importlib.import_module(name) for name in ("diffmem.pipelines", "diffmem.cli._common",
                                                           "diffmem.workflows.mitigate", "diffmem.workflows.demo",
                                                           "diffmem.workflows.audit")]
    for module in modules:
        if hasattr(module, "load_pipeline"):
            monkeypatch.setattr(module, "load_pipeline", lambda *a, **k: pytest.fail("the model must not load"))
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "a red cat", "split": "locate"}) + "\n")
    for argv in (["prune", model_dir, "--edit", mask_file, "--out", tmp_path / "o", "--push-to-hub", "bad id!"],
                 ["mitigate", model_dir, "--prompts", tmp_path / "m.jsonl", "--out", tmp_path / "o",
                  "--push-to-hub", "bad id!"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffmem: error: --push-to-hub 'bad id!'") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_mitigate_pushes_its_exported_model(model_dir, tmp_path, monkeypatch, capsys):
    import diffmem.modelcard
    import diffmem.workflows.mitigate

    def fake_run(run):
        (Path(run.out) / "pruned").mkdir(parents=True)
        return {"headline_text": "done"}

    pushed = []
    monkeypatch.setattr(diffmem.workflows.mitigate, "run_mitigate", fake_run)
    monkeypatch.setattr(diffmem.modelcard, "push_to_hub", lambda folder, repo_id: pushed.append((folder, repo_id)))
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "a red cat", "split": "locate"}) + "\n")
    assert main(["mitigate", str(model_dir), "--prompts", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "run"),
                 "--push-to-hub", "a/b"]) == 0
    assert pushed == [(tmp_path / "run" / "pruned", "a/b")]


def test_push_error_is_a_user_error():
    assert issubclass(PushError, DiffmemError) and not issubclass(PushError, ValueError)
