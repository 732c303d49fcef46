"""The VLM layer: loading (local folders, built-in names, hub offline), encoding, stages, errors,
and `mwm vlm train` end to end on phantoms. Offline: the BiomedCLIP-shaped model is built locally
with random weights (full ViT-B/16 image tower, a small BERT text tower)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mwm.cli import app
from mwm.config import resolve
from mwm.errors import MWMError
from mwm.localize.vlm import (BIOMEDCLIP_HUB, BIOMEDCLIP_MEAN, CONFIG_FILE, WEIGHTS_FILE, PromptError, VLMError,
                              build_biomedclip_like, count_tokens, export_vlm, load_vlm)
from mwm.localize.vlm_train import (VLMTrainConfig, load_pairs, lr_factor, random_resized_crop,
                                    retrieval_metrics)

runner = CliRunner()

# A very small tiny-CLIP so that training runs take a few seconds.
SMALL = ["--set", "model.width=32", "--set", "model.heads=2", "--set", "model.layers=1", "--set",
         "model.text_width=32", "--set", "model.text_heads=1", "--set", "model.text_layers=1", "--set",
         "model.embed_dim=16"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def biomed_dir(tmp_path_factory):
    return build_biomedclip_like(tmp_path_factory.mktemp("vlm") / "biomedclip", text_layers=2, text_width=64)


@pytest.fixture(scope="module")
def biomed(biomed_dir):
    return load_vlm(biomed_dir)


def _light_copy(src, dst, weights=True):
    """The folder without copying 350 MB of weights (a symlink stands in)."""
    dst.mkdir()
    shutil.copy(src / CONFIG_FILE, dst / CONFIG_FILE)
    shutil.copytree(src / "text", dst / "text")
    if weights:
        (dst / WEIGHTS_FILE).symlink_to(src / WEIGHTS_FILE)
    return dst


def test_biomedclip_like_loads_offline_and_encodes(biomed, biomed_dir):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    saved = json.loads((biomed_dir / CONFIG_FILE).read_text())
    assert saved["model_cfg"]["text_cfg"]["hf_model_name"] == "./text"  # relative: the folder can move
    assert saved["model_cfg"]["vision_cfg"]["timm_model_name"] == "vit_base_patch16_224"
    v = biomed
    assert v.image_size == (224, 224) and v.patch_size == (16, 16) and v.stages.grid == (14, 14)
    assert v.context_length == 256 and v.embed_dim == 512 and v.name == str(biomed_dir)
    assert v.mean == pytest.approx(BIOMEDCLIP_MEAN)
    assert not v.model.training and not any(p.requires_grad for p in v.model.parameters())
    t = v.encode_text(["brain tumor", "a head scan with a small bright round lesion in the upper left"])
    assert t.shape == (2, 512) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(v.encode_text("brain tumor")[0], t[0]) and len(v._text_cache) == 2  # cached
    f = v.encode_image(torch.rand(2, 1, 48, 40))
    assert f.shape == (2, 512) and torch.allclose(f.norm(dim=-1), torch.ones(2), atol=1e-5)
    # every phantom caption word is in the small vocabulary: no [UNK] (id 1)
    ids = v.tokenizer(["a body scan with two lesions: a large dark irregular speckled lesion in the middle left"])
    assert 1 not in ids.tolist()[0]


def test_stages_reproduce_encode_image_exactly(biomed):
    x = biomed.preprocess(torch.rand(2, 3, 100, 80))
    assert x.shape == (2, 3, 224, 224)
    st = biomed.stages
    with torch.no_grad():
        tokens = st.embed(x)
        assert tokens.shape == (2, st.num_prefix_tokens + 14 * 14, 768)
        out = st.head(st.run_blocks(st.run_blocks(tokens, 0, 6), 6))
        ref = biomed.model.encode_image(x)
    assert torch.equal(out, ref)


def test_preprocess_gray_normalize_and_tiny_images(biomed):
    gray = torch.rand(1, 1, 40, 40)
    assert torch.equal(biomed.preprocess(gray), biomed.preprocess(gray.expand(-1, 3, -1, -1)))
    flat = torch.tensor(biomed.mean).view(1, 3, 1, 1).expand(1, 3, 40, 40)
    assert biomed.preprocess(flat).abs().max() < 1e-5  # the mean maps to 0
    with pytest.raises(VLMError, match=r"16×16 px.*two patches \(32 px\).*--size 224"):
        biomed.preprocess(torch.rand(1, 1, 16, 16))
    with pytest.raises(VLMError, match="1 or 3"):
        biomed.preprocess(torch.rand(1, 2, 64, 64))


def _smooth_image(h: int, w: int, phase: float) -> np.ndarray:
    """uint8 (h, w, 3) with structure at several scales (no noise: PIL clips uint8 between its two passes)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.25 * np.sin(xx / 6.0 + phase) * np.cos(yy / 4.0) + 0.2 * np.sin((xx + 2 * yy) / 17.0)
    return (np.clip(base, 0, 1)[..., None] * np.array([255, 210, 160])).astype(np.uint8)


def _as_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 255.0


PIL_ATOL = 0.03  # normalized units; PIL rounds to uint8 (1/255 ≈ 0.015 here) after each of its two passes


def test_preprocess_is_the_models_open_clip_transform(biomed):
    # BiomedCLIP's preprocess_cfg gives mean/std only: open_clip's defaults apply (bicubic, shortest side,
    # centre crop), as they do for the hub model; the MWM authors' HF processor does the same.
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    assert biomed.interpolation == "bicubic" and biomed.resize_mode == "shortest" and biomed.resize_policy == "crop"
    ref_tf = image_transform_v2(PreprocessCfg(**biomed.preprocess_cfg), is_train=False)
    for h, w in [(150, 90), (60, 100)]:  # a downscale and an upscale, both non-square
        arrays = [_smooth_image(h, w, p) for p in (0.0, 1.0)]
        ours = biomed.preprocess(_as_batch(arrays))
        ref = torch.stack([ref_tf(Image.fromarray(a)) for a in arrays])
        assert ours.shape == ref.shape == (2, 3, 224, 224)
        assert (ours - ref).abs().max() < PIL_ATOL, (h, w, float((ours - ref).abs().max()))
    gray = _smooth_image(80, 120, 0.5)[..., 0]  # a gray PIL image is converted to RGB by open_clip
    ours = biomed.preprocess(torch.from_numpy(gray)[None, None].float() / 255.0)
    assert (ours[0] - ref_tf(Image.fromarray(gray))).abs().max() < PIL_ATOL
    x = torch.rand(2, 3, 224, 224)  # already at the model's size (what `mwm localize` passes): only normalized
    m, s = torch.tensor(biomed.mean).view(1, 3, 1, 1), torch.tensor(biomed.std).view(1, 3, 1, 1)
    assert torch.allclose(biomed.preprocess(x), (x - m) / s, atol=1e-6)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_prepare_images_matches_open_clip(resize_mode, interpolation):
    from open_clip.transform import image_transform
    from PIL import Image

    from mwm.localize.vlm import prepare_images

    mean, std = (0.5, 0.4, 0.3), (0.25, 0.3, 0.2)
    for size in [(48, 48), (40, 56)]:
        tf = image_transform(size, False, mean, std, resize_mode=resize_mode, interpolation=interpolation,
                             fill_color=128)
        arrays = [_smooth_image(70, 45, p) for p in (0.0, 2.0)]
        ours = prepare_images(_as_batch(arrays), size, mean, std, interpolation=interpolation,
                              resize_mode=resize_mode, fill_color=128)
        ref = torch.stack([tf(Image.fromarray(a)) for a in arrays])
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < PIL_ATOL, (size, float((ours - ref).abs().max()))


def test_prompt_errors_and_truncation(biomed):
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        biomed.encode_text(["brain tumor", "   "])
    with pytest.raises(MWMError, match="no prompts"):
        biomed.encode_text([])
    long = " ".join(["lesion"] * 300)
    assert count_tokens(biomed.tokenizer, long) == 302
    with pytest.warns(UserWarning, match=r"prompt 'lesion lesion.*302 tokens.*context of 256"):
        e = biomed.encode_text([long])
    cut = " ".join(["lesion"] * 254)  # [CLS] + 254 + [SEP]: what truncation keeps
    assert torch.allclose(e, biomed.encode_text([cut]), atol=1e-6)


def test_export_roundtrip(tmp_path):
    # same structure with a ViT-Ti trunk: the export path is what is tested, not the tower size
    src = load_vlm(build_biomedclip_like(tmp_path / "src", text_layers=1, text_width=32, vision="vit_tiny_patch16_224"))
    out = export_vlm(src.model, src.model_cfg, src.preprocess_cfg, tmp_path / "exp", tokenizer=src.tokenizer)
    cfg = json.loads((out / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    assert cfg["hf_model_name"] == cfg["hf_tokenizer_name"] == "./text"
    moved = shutil.move(str(out), str(tmp_path / "moved"))  # relative paths: the folder can move
    v = load_vlm(moved)
    p = ["a head scan with no lesion", "tumor"]
    assert torch.allclose(v.encode_text(p), src.encode_text(p), atol=1e-6)
    x = torch.rand(2, 1, 64, 64)
    assert torch.allclose(v.encode_image(x), src.encode_image(x), atol=1e-6)
    with pytest.raises(VLMError, match="tokenizer_files=FOLDER"):  # an HF tokenizer must come from somewhere
        cfg = {**src.model_cfg, "text_cfg": {**src.model_cfg["text_cfg"], "hf_tokenizer_name": "org/remote"}}
        export_vlm(src.model, cfg, src.preprocess_cfg, tmp_path / "exp2")


def test_missing_files_are_named(biomed_dir, tmp_path):
    with pytest.raises(VLMError, match=r"open_clip_config.json is missing"):
        load_vlm(tmp_path)
    d = _light_copy(biomed_dir, tmp_path / "noweights", weights=False)
    with pytest.raises(VLMError, match=rf"{d}.* no weights file: expected {WEIGHTS_FILE}.*never used silently"):
        load_vlm(d)
    d = _light_copy(biomed_dir, tmp_path / "novocab")
    (d / "text" / "vocab.txt").unlink()
    with pytest.raises(VLMError, match=r"text has no tokenizer files.*vocab.txt"):
        load_vlm(d)
    d = _light_copy(biomed_dir, tmp_path / "noconfig")
    (d / "text" / "config.json").unlink()
    with pytest.raises(VLMError, match=r"text/config.json is missing"):
        load_vlm(d)
    d = _light_copy(biomed_dir, tmp_path / "notext")
    shutil.rmtree(d / "text")
    with pytest.raises(VLMError, match=r"hf_model_name = './text' but .*notext/text does not exist"):
        load_vlm(d)


def test_builtin_names_and_hub_offline(tmp_path):
    with pytest.raises(VLMError, match=r"'ViT-B-16' is an open_clip architecture.*--pretrained random"):
        load_vlm("ViT-B-16")
    with pytest.raises(VLMError, match="not a known tag|pass a weights file"):
        load_vlm("ViT-B-16", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(VLMError, match="neither an existing folder nor an open_clip model name"):
        load_vlm("no-such-model")
    with pytest.raises(VLMError, match="not an existing folder"):
        load_vlm(str(tmp_path / "nope"))
    t0 = time.perf_counter()
    with pytest.raises(VLMError, match=r"HF_HUB_OFFLINE=1 is set.*--vlm DIR") as e:
        load_vlm(BIOMEDCLIP_HUB)
    assert "mwm vlm export" in str(e.value) and time.perf_counter() - t0 < 30  # fails fast, no hanging retries


def test_pure_training_pieces():
    x = torch.rand(3, 1, 16, 16)
    same = random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    y = random_resized_crop(x, (0.5, 0.5), generator=g)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert lr_factor(0, 10, 100) == pytest.approx(0.1) and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-9)
    feats = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    idx = torch.tensor([0, 1, 2, 0])  # image 3 shares caption 0
    m = retrieval_metrics(feats[idx], feats, idx)
    assert m["t2i_top1"] == 1.0 and m["i2t_top1"] == 1.0 and m["chance_i2t_top1"] == pytest.approx(1 / 3)
    assert m["majority_i2t_top1"] == 0.5 and m["chance_t2i_top1"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)


def test_caption_sources(phantoms_npz, tmp_path):
    import numpy as np

    ids = np.load(phantoms_npz)["filenames"].tolist()
    f = tmp_path / "caps.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        w.writerows([[i, f"scan number {k}"] for k, i in enumerate(ids[::2])])
    cfg = VLMTrainConfig(data=phantoms_npz, out=tmp_path / "o", captions=str(f))
    with pytest.warns(UserWarning, match="have no caption"):
        train, ev = load_pairs(cfg, 32)
    assert all(c.startswith("scan number") for c in train.captions + ev.captions)
    assert train.images.shape[1:] == (1, 32, 32) and train.split == "train"
    j = tmp_path / "caps.jsonl"
    j.write_text("\n".join(json.dumps({"image": i, "caption": "x"}) for i in ids) + "\n")
    train, _ = load_pairs(VLMTrainConfig(data=phantoms_npz, out=tmp_path / "o", captions=str(j)), 32)
    assert set(train.captions) == {"x"}
    cfg = VLMTrainConfig(data=phantoms_npz, out=tmp_path / "o", captions="template", modality="brain MRI")
    train, _ = load_pairs(cfg, 32)
    assert set(train.captions) <= {f"a brain MRI image showing {c}" for c in ("normal", "benign", "malignant")}
    with pytest.raises(MWMError, match=r"only \{modality\} and \{class\}"):
        resolve(VLMTrainConfig, None, ["template=a {organ}"], {"data": phantoms_npz, "out": tmp_path})


def test_vlm_train_cli_resume_and_load(phantoms_npz, tmp_path):
    out = tmp_path / "tinyclip"
    common = [phantoms_npz, "--out", out, "--batch-size", 16, "--size", 32, "--device", "cpu", "--quiet", *SMALL]
    r = run("vlm", "train", *common, "--epochs", 1, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["epoch"] == 1 and m["epochs_run"] == 1 and m["eval_split"] == "test" and 0 <= m["t2i_top5"] <= 1
    for f in (CONFIG_FILE, WEIGHTS_FILE, "checkpoints/last.pt", "train_log.csv", "config.yaml"):
        assert (out / f).is_file(), f
    r = run("vlm", "train", *common, "--epochs", 2)
    assert r.exit_code == 2 and "--resume" in r.output  # never silently overwrite a run
    r = run("vlm", "train", *common, "--epochs", 2, "--lr", 0.01, "--resume")
    assert r.exit_code == 2 and "lr" in r.output
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)  # a checkpoint from before model.pool_type
    del ck["config"]["model"]["pool_type"]
    torch.save(ck, out / "checkpoints/last.pt")
    r = run("vlm", "train", *common, "--epochs", 2, "--resume", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["epoch"] == 2 and m["epochs_run"] == 1
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and int(rows[1]["step"]) == 2 * int(rows[0]["step"])
    v = load_vlm(out)
    assert v.image_size == (32, 32) and v.patch_size == (8, 8) and v.embed_dim == 16 and v.context_length == 40
    assert v.encode_text(["a head scan with no lesion"]).shape == (1, 16)
    x = torch.rand(3, 1, 32, 32)
    assert v.encode_image(x).shape == (3, 16)
    st = v.stages
    with torch.no_grad():
        xx = v.preprocess(x)
        assert torch.equal(st.head(st.run_blocks(st.embed(xx), 0)), v.model.encode_image(xx))


def test_vlm_train_template_captions(phantoms_npz, tmp_path):
    out = tmp_path / "tpl"
    r = run("vlm", "train", phantoms_npz, "--out", out, "--captions", "template", "--modality", "head CT",
            "--epochs", 1, "--batch-size", 16, "--size", 32, "--device", "cpu", "--quiet", "--json", *SMALL)
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["eval_distinct_captions"] <= 3
    assert "captions: template" in (out / "config.yaml").read_text()
    assert load_vlm(out).encode_text(["a head CT image showing malignant"]).shape == (1, 16)
    r = run("vlm", "export", out, tmp_path / "copy")  # a folder re-exported (checks it loads before saying so)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "copy" / WEIGHTS_FILE).is_file() and not (tmp_path / "copy" / "checkpoints").exists()


def test_clip_loss_already_treats_repeated_captions_as_positives():
    # Identical captions give identical text embeddings, so ClipLoss's diagonal targets equal a multi-positive
    # loss (target uniform over same-caption items, UniCL Eq. 3) in value and in the gradients the encoders get
    # (images; text summed over each distinct caption). The docstring of vlm_train relies on this.
    from open_clip import ClipLoss

    g = torch.Generator().manual_seed(0)
    cap = torch.randint(0, 4, (24,), generator=g)
    txt_u = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_(True)
    img = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=-1).requires_grad_(True)
    scale = torch.tensor(20.0)

    def multi_positive(i, t):
        logits = scale * i @ t.T
        same = (cap[:, None] == cap[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        return -0.5 * ((target * logits.log_softmax(1)).sum(1).mean() + (target * logits.T.log_softmax(1)).sum(1).mean())

    a, b = ClipLoss()(img, txt_u[cap], scale), multi_positive(img, txt_u[cap])
    assert torch.allclose(a, b, atol=1e-5)
    for ga, gb in zip(torch.autograd.grad(a, [img, txt_u]), torch.autograd.grad(b, [img, txt_u])):
        assert torch.allclose(ga, gb, atol=1e-5)


def test_vlm_train_avg_pool(phantoms_npz, tmp_path):
    out = tmp_path / "avg"
    r = run("vlm", "train", phantoms_npz, "--out", out, "--epochs", 1, "--batch-size", 16, "--size", 32,
            "--device", "cpu", "--quiet", *SMALL, "--set", "model.pool_type=avg")
    assert r.exit_code == 0, r.output
    v = load_vlm(out)
    assert v.model.visual.pool_type == "avg"
    st, x = v.stages, v.preprocess(torch.rand(2, 1, 32, 32))
    with torch.no_grad():  # the M2IB stages pool as the model does
        assert torch.equal(st.head(st.run_blocks(st.embed(x), 0)), v.model.encode_image(x))
