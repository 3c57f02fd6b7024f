"""`blip3o-sample` end to end on a tiny random release (tools/make_tiny_release.py): text -> image, image -> text,
image -> image, benchmark layouts, resume, batch/device invariance, one-line errors, and the pixels and tokens of
the same weights composed in PyTorch as the original composes them (transformers Qwen2.5-VL + the DiT built from
diffusers layers + diffusers UNet/VAE/Euler).

Compile time dominates: the runs share one process-wide model cache (`sample._LOADED`) and use few sampler steps
(the programs are loops, so the step count does not change what is compiled), short prompts (one length bucket)
and --batch 3 on one device unless a test is about batches or devices.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_jax import cli, sample
from blip3o_jax import sample_formats as fmts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import make_tiny_release  # noqa: E402

STEPS = ["--dit_steps", "4", "--decoder_steps", "4"]
ONE_DEVICE = ["--batch", "3", "--devices", "1"]
PROMPTS = ["a red circle", "a small green square", "a blue star on white"]
# long enough to share the MME questions' length bucket (one i2t compilation for the module)
QUESTION = "Please describe the colours, the shapes and the textures you can see in this picture in detail."


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_release.make_tiny_release(str(tmp_path_factory.mktemp("release") / "tiny"), sana=True)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")  # a blank line is not a prompt
    return str(path)


def t2i(release, out, *extra):
    return sample.run(["t2i", "--model", release, "--out", str(out), "--progress=false", *STEPS, *extra])


def pngs(folder) -> dict[str, np.ndarray]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            if n.endswith(".png") and n != "contact_sheet.png":
                out[os.path.relpath(os.path.join(root, n), folder)] = np.asarray(Image.open(os.path.join(root, n)))
    return out


def all_files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns)


@pytest.fixture(scope="module")
def uninterrupted(release, prompt_file, tmp_path_factory):
    """The reference run: 3 prompts x 2 images, --batch 3 on one device."""
    out = tmp_path_factory.mktemp("t2i") / "b3"
    record = t2i(release, out, "--prompts", prompt_file, "--num_images_per_prompt", "2", *ONE_DEVICE)
    return str(out), record


def test_tiny_release_layout(release):
    from blip3o_jax.convert.common import read_safetensors_header

    config = json.load(open(os.path.join(release, "config.json")))
    assert config["model_type"] == "blip3o_qwen" and config["n_query"] == 16 and "vision_config" in config
    header, _ = read_safetensors_header(os.path.join(release, "model.safetensors"))
    families = {"model.latent_queries", "model.embed_tokens.weight", "model.norm.weight"}
    assert families <= set(header)
    for prefix in ("model.layers.1.self_attn.q_proj", "model.dit.model.layers.1.gate",
                   "model.dit.model.caption_projection.linear_1", "model.gen_vision_tower.vision_tower.model.blocks.1",
                   "visual.blocks.1.attn.qkv", "visual.merger.mlp.0"):
        assert any(k.startswith(prefix) for k in header), prefix
    assert header["model.latent_queries"]["shape"] == [1, 16, 64]
    # the tokenizer's special tokens in the release's order: Qwen2.5-VL's, then [IMG], [/IMG], <image>
    tok = json.load(open(os.path.join(release, "tokenizer.json")))
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    ids = [added[t] for t in make_tiny_release.RELEASE_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids))) and config["image_token_id"] == added["<|image_pad|>"]
    dec = os.path.join(release, "diffusion-decoder")
    for part in ("unet", "vae"):
        h, _ = read_safetensors_header(os.path.join(dec, part, "diffusion_pytorch_model.bf16.safetensors"))
        assert {v["dtype"] for v in h.values()} == {"BF16"}
    assert json.load(open(os.path.join(dec, "scheduler", "scheduler_config.json")))["_class_name"] == \
        "EulerDiscreteScheduler"


def test_t2i_png_run(uninterrupted):
    out, record = uninterrupted
    images = pngs(out)
    assert sorted(images) == [f"{i:05d}_{k:02d}.png" for i in range(3) for k in range(2)]
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in images.values())  # the decoder's native size
    assert min(a.std() for a in images.values()) > 5  # pictures, not constants
    # different noise per image and per prompt
    assert np.abs(images["00000_00.png"].astype(int) - images["00000_01.png"]).mean() > 5
    assert np.abs(images["00000_00.png"].astype(int) - images["00001_00.png"]).mean() > 5
    assert os.path.exists(os.path.join(out, "contact_sheet.png"))
    rows = [json.loads(line) for line in open(os.path.join(out, "prompts.jsonl"))]
    assert [r["prompt"] for r in rows] == PROMPTS
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["complete"] and run["images_written"] == 6 and run["settings"]["decoder_steps"] == 4
    assert len(run["model"]["fingerprint"]) == 64 and run["model"]["decoder"]["fingerprint"]
    assert record["images_per_s"] > 0


def test_t2i_batch_and_device_invariance(release, prompt_file, uninterrupted, tmp_path):
    """--batch 1, --batch 3 (one device) and --batch 8 over 8 devices: the same pixels, within one grey level
    where XLA's reductions differ with the batch shape (how many PNGs are byte-identical is printed)."""
    import jax

    assert jax.local_device_count() == 8
    ref = pngs(uninterrupted[0])
    for name, extra in (("batch1", ["--batch", "1", "--devices", "1"]), ("devices8", ["--batch", "8"])):
        record = t2i(release, tmp_path / name, "--prompts", prompt_file, "--num_images_per_prompt", "2", *extra)
        assert record["devices"] == (1 if name == "batch1" else 8)
        got = pngs(tmp_path / name)
        assert sorted(got) == sorted(ref)
        diffs = {f: int(np.abs(got[f].astype(int) - ref[f]).max()) for f in ref}
        same = sum(open(tmp_path / name / f, "rb").read() == open(os.path.join(uninterrupted[0], f), "rb").read()
                   for f in ref)
        print(f"[invariance] {name} vs batch3: {same}/{len(ref)} PNGs byte-identical, max diff {max(diffs.values())}")
        assert max(diffs.values()) <= 1, diffs


def test_killed_run_finishes_with_the_uninterrupted_file_set(release, prompt_file, uninterrupted, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "resumed"
    real = fmts.write_bytes
    calls = []

    def dies_on_the_third_png(path, data):
        calls.append(path)
        if len(calls) == 5:  # prompts.jsonl, run.json and 2 PNGs land; the 3rd PNG is killed mid-write
            folder, name = os.path.split(path)
            with open(os.path.join(folder, f".{name}{fmts.PARTIAL_SUFFIX}"), "wb") as f:
                f.write(data[:10])
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(fmts, "write_bytes", dies_on_the_third_png)
    with pytest.raises(KeyboardInterrupt):
        t2i(release, out, "--prompts", prompt_file, "--num_images_per_prompt", "2", *ONE_DEVICE)
    monkeypatch.setattr(fmts, "write_bytes", real)
    assert not json.load(open(out / "run.json"))["complete"]
    assert any(n.endswith(fmts.PARTIAL_SUFFIX) for n in all_files(out))  # the torn write, as a kill leaves it
    record = t2i(release, out, "--prompts", prompt_file, "--num_images_per_prompt", "2", *ONE_DEVICE)
    assert record["images_done_before"] == 2 and record["images_written"] == 4
    assert all_files(out) == all_files(uninterrupted[0])
    ref, got = pngs(uninterrupted[0]), pngs(out)
    assert max(int(np.abs(got[f].astype(int) - ref[f]).max()) for f in ref) <= 1
    # a deleted output is regenerated, nothing else
    os.remove(out / "00001_01.png")
    again = t2i(release, out, "--prompts", prompt_file, "--num_images_per_prompt", "2", *ONE_DEVICE)
    assert again["images_written"] == 1 and all_files(out) == all_files(uninterrupted[0])


def test_t2i_from_a_converted_checkpoint(release, prompt_file, uninterrupted, tmp_path):
    """The layout convert_torch_weights.py writes (Orbax params/, blip3o_jax.json, config.json + tokenizer copied)
    with --decoder pointing at the release's decoder: the same images as from the release itself."""
    import orbax.checkpoint as ocp

    from blip3o_jax import convert, pretrained

    hf = json.load(open(os.path.join(release, "config.json")))
    cfg = sample.release_config(hf, gen_encoder=True)
    params = convert.from_torch("blip3o", sample.read_release_tensors(release, lambda k: not k.startswith(
        "visual.")), cfg)
    converted = tmp_path / "converted"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(converted / pretrained.PARAMS_DIR), params)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(release, name), converted / name)
    (converted / pretrained.META_FILE).write_text(json.dumps({"kind": "blip3o", "dtype": "float32"}))
    out = tmp_path / "out"
    with pytest.raises(cli.UserError, match="no diffusion-decoder/ folder; pass --decoder DIR"):
        t2i(str(converted), out, "--prompts", prompt_file)
    record = t2i(str(converted), out, "--prompts", prompt_file, "--num_images_per_prompt", "2", "--decoder",
                 os.path.join(release, "diffusion-decoder"), *ONE_DEVICE)
    assert record["model"]["layout"] == "converted"
    ref = pngs(uninterrupted[0])
    got = pngs(out)
    assert sorted(got) == sorted(ref) and all(np.array_equal(got[f], ref[f]) for f in ref)


def test_geneval_layout(release, tmp_path):
    meta = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
            "not json",
            {"tag": "counting", "include": [{"class": "clock", "count": 2}],
             "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}]
    src = tmp_path / "evaluation_metadata.jsonl"
    src.write_text("\n".join(m if isinstance(m, str) else json.dumps(m) for m in meta))  # no trailing newline
    out = tmp_path / "geneval"
    record = t2i(release, out, "--prompts", str(src), "--format", "geneval", *ONE_DEVICE)
    # what evaluate_images.py reads: all-digit folders, metadata.jsonl as ONE object, samples/\d+.png
    folders = sorted(n for n in os.listdir(out) if os.path.isdir(out / n))
    assert folders == ["00000", "00002"]  # the folder is the prompt's line index; the bad line is skipped
    for folder, m in zip(folders, (meta[0], meta[2])):
        assert json.load(open(out / folder / "metadata.jsonl")) == m
        samples = sorted(os.listdir(out / folder / "samples"))
        assert samples == ["0000.png", "0001.png", "0002.png", "0003.png"]  # 4 per prompt by default
        assert all(re.match(r"\d+\.png", s) for s in samples)
    assert record["skipped"] == [{"index": 1, "key": "00001", "reason": "line is not valid JSON (Expecting "
                                  "value)"}]
    # the original's seed rule: every prompt's image k starts from the same noise
    same = tmp_path / "geneval_original_seed"
    t2i(release, same, "--prompts", str(src), "--format", "geneval", "--noise_rule", "original", *ONE_DEVICE)
    a, b = pngs(same), pngs(out)
    assert np.abs(a["00000/samples/0000.png"].astype(int) - b["00000/samples/0000.png"]).max() <= 1  # item 0 alike
    assert np.abs(a["00002/samples/0000.png"].astype(int) - b["00002/samples/0000.png"]).mean() > 5


def test_dpg_layout_tiles_are_the_images(release, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "COCOval7.txt").write_text("a red circle\n")
    (prompts / "partiprompts12.txt").write_text(" a small  green square ")
    out = tmp_path / "dpg_images"
    t2i(release, out, "--prompts", str(prompts), "--format", "dpg", *ONE_DEVICE)
    # the scorer lists every file of the folder and keys them by basename.split('.')[0]
    assert sorted(os.listdir(out)) == ["COCOval7.png", "partiprompts12.png"]
    assert json.load(open(str(out) + ".run.json"))["complete"]
    # tiles (left, top) = (0,0), (R,0), (0,R), (R,R) are images 0..3 of the prompt
    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle\na small green square\n")
    t2i(release, tmp_path / "png", "--prompts", str(plain), "--num_images_per_prompt", "4", *ONE_DEVICE)
    singles = pngs(tmp_path / "png")
    for index, stem in enumerate(("COCOval7", "partiprompts12")):
        grid = np.asarray(Image.open(out / f"{stem}.png"))
        assert grid.shape == (64, 64, 3)
        for k, (top, left) in enumerate(((0, 0), (0, 32), (32, 0), (32, 32))):
            tile = grid[top:top + 32, left:left + 32].astype(int)
            assert np.abs(tile - singles[f"{index:05d}_{k:02d}.png"]).max() <= 1, (stem, k)
    with pytest.raises(cli.UserError, match="must be 4"):
        t2i(release, tmp_path / "dpg2", "--prompts", str(prompts), "--format", "dpg", "--num_images_per_prompt", "2")


def test_wise_layout(release, tmp_path):
    data = tmp_path / "WISE_legacy" / "data"
    data.mkdir(parents=True)
    (data / "cultural_common_sense.json").write_text(json.dumps([
        {"Prompt": "a red circle", "Explanation": "-", "Category": "Cultural knowledge", "Subcategory": "x",
         "prompt_id": 1}]))
    (data / "spatio-temporal_reasoning.json").write_text(json.dumps([
        {"Prompt": "a blue star on white", "Explanation": "-", "Category": "Time", "Subcategory": "y",
         "prompt_id": 402},
        {"Prompt": "", "prompt_id": 403}]))
    out = tmp_path / "wise"
    record = t2i(release, out, "--prompts", str(data / "*.json"), "--format", "wise", *ONE_DEVICE)
    assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == ["1.png", "402.png"]
    assert record["wise_categories"] == {"culture": 1, "time": 1}
    assert record["skipped"][0]["key"] == "403" and "empty" in record["skipped"][0]["reason"]
    verified = tmp_path / "data_verified"
    verified.mkdir()
    (verified / "natural_science_verified.json").write_text(json.dumps([{"Prompt": "a cat", "prompt_id": 701}]))
    with pytest.raises(cli.UserError, match="verified prompt file, but --wise_version is legacy"):
        t2i(release, tmp_path / "wise2", "--prompts", str(verified / "*.json"), "--format", "wise")
    assert fmts.wise_category(567, "legacy") == "time" and fmts.wise_category(567, "verified") == "space"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(((64, 64), (80, 48), (40, 90))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_i2t_jsonl_skips_unreadable_images_and_resumes(release, images, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "answers.jsonl"
    args = ["i2t", "--model", release, "--images", str(folder / "*.png"), "--question", QUESTION,
            "--out", str(out), "--max_new_tokens", "6", "--batch", "2", "--progress=false"]
    record = sample.run(args)
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == ["img0.png", "img1.png", "img2.png"] and record["written"] == 3
    assert all(isinstance(r["prediction"], str) for r in rows)
    assert record["skipped"][0]["key"] == "broken.png" and "cannot open image" in record["skipped"][0]["reason"]
    run = json.load(open(tmp_path / "answers.run.json"))
    assert run["complete"] and run["settings"]["max_pixels"] == 112 * 112  # from preprocessor_config.json
    # a torn last line (a killed run) is dropped and that question answered again; finished ones are kept
    lines = open(out).read().splitlines(keepends=True)
    open(out, "w").write("".join(lines[:2]) + lines[2][:15])
    again = sample.run(args)
    assert again["done_before"] == 2 and again["written"] == 1
    assert [json.loads(line) for line in open(out)] == rows


def test_i2t_mme_layout(release, images, tmp_path):
    rows = [
        {"question_id": "existence/img0.png", "image": "img0.png", "category": "existence", "answer": "Yes",
         "question": "Is there a cat in the image? Please answer yes or no."},
        {"question_id": "OCR/img1.png", "image": "img1.png", "category": "OCR", "answer": "Yes",
         "question": "Is the word 'stop' in the image? Please answer yes or no."},
        {"question_id": "existence/img0.png", "image": "img0.png", "category": "existence", "answer": "No",
         "question": "Is there a dog in the image? Please answer yes or no."},
        {"question_id": "OCR/img1.png", "image": "img1.png", "category": "OCR", "answer": "No",
         "question": "Is the word 'go' in the image? Please answer yes or no."},
    ]
    src = images / "mme.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "mme"
    sample.run(["i2t", "--model", release, "--images", str(src), "--format", "mme", "--out", str(out), "--batch",
                "2", "--min_pixels", "3136", "--max_pixels", "12544", "--max_new_tokens", "6", "--progress=false"])
    assert sorted(os.listdir(out)) == ["OCR.txt", "existence.txt", "predictions.jsonl", "run.json"]
    lines = open(out / "existence.txt").read().splitlines()
    # calculation.py: image_name \t question \t answer \t prediction, the two questions of an image adjacent
    fields = [line.split("\t") for line in lines]
    assert [f[:3] for f in fields] == [["img0.png", rows[0]["question"], "Yes"], ["img0.png", rows[2]["question"],
                                                                                  "No"]]
    assert all(len(f) == 4 and "\n" not in f[3] for f in fields)
    preds = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [p["index"] for p in preds] == [0, 1, 2, 3] and preds[1]["category"] == "OCR"
    assert fmts.mme_question(rows[0]["question"]) == \
        "Is there a cat in the image?\nAnswer the question using a single word or phrase."


def test_i2i_sdxl_and_sana(release, images, tmp_path):
    out = tmp_path / "sdxl"
    record = sample.run(["i2i", "--model", release, "--images", str(images / "*.png"), "--out", str(out),
                         "--decoder_steps", "4", "--batch", "3", "--devices", "1", "--progress=false"])
    recon = pngs(out)
    assert sorted(recon) == ["img0.png", "img1.png", "img2.png"] and record["written"] == 3
    assert recon["img0.png"].shape == (32, 32, 3)
    assert np.abs(recon["img0.png"].astype(int) - recon["img1.png"]).mean() > 5
    out = tmp_path / "sana"
    sample.run(["i2i", "--model", os.path.join(release, "sana-decoder"), "--decoder", "sana", "--images",
                str(images / "*.png"), "--out", str(out), "--decoder_steps", "3", "--batch", "3", "--progress=false"])
    recon = pngs(out)
    assert sorted(recon) == ["img0.png", "img1.png", "img2.png"]
    assert recon["img0.png"].shape == (8, 8, 3)  # the tiny SANA's 4x4 latent x the tiny DC-AE's factor 2
    again = sample.run(["i2i", "--model", os.path.join(release, "sana-decoder"), "--decoder", "sana", "--images",
                        str(images / "*.png"), "--out", str(out), "--decoder_steps", "3", "--progress=false"])
    assert again["written"] == 0 and again["done_before"] == 3


def test_bad_inputs(release, prompt_file, images, tmp_path):
    # a missing model part
    broken = tmp_path / "no_vae"
    shutil.copytree(release, broken)
    shutil.rmtree(broken / "diffusion-decoder" / "vae")
    with pytest.raises(cli.UserError, match=r"diffusion-decoder: no vae/config.json"):
        t2i(str(broken), tmp_path / "o1", "--prompts", prompt_file)
    assert not os.path.exists(tmp_path / "o1")
    shutil.rmtree(broken / "diffusion-decoder")
    with pytest.raises(cli.UserError, match=r"no diffusion-decoder/ folder"):
        sample.run(["i2i", "--model", str(broken), "--images", str(images / "*.png"), "--out", str(tmp_path / "o1")])
    os.remove(broken / "model.safetensors")
    with pytest.raises(cli.UserError, match=r"no safetensors weights"):
        t2i(str(broken), tmp_path / "o1", "--prompts", prompt_file, "--decoder", os.path.join(release,
                                                                                            "diffusion-decoder"))
    # an empty prompt file
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(cli.UserError, match="no prompts in it"):
        t2i(release, tmp_path / "o2", "--prompts", str(empty))
    # only unreadable images
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(cli.UserError, match="no readable images"):
        sample.run(["i2i", "--model", release, "--images", str(tmp_path / "bad.png"), "--out", str(tmp_path / "o3")])
    assert not os.path.exists(tmp_path / "o3")
    with pytest.raises(cli.UserError, match="no usable inputs"):
        sample.run(["i2t", "--model", release, "--images", str(tmp_path / "bad.png"), "--question", "What?",
                    "--out", str(tmp_path / "o4.jsonl")])
    # a resolution the decoder cannot take: refused before any weight is read or file written
    with pytest.raises(cli.UserError, match="--resolution 36 is not a positive multiple of 8"):
        t2i(release, tmp_path / "o5", "--prompts", prompt_file, "--resolution", "36")
    assert not os.path.exists(tmp_path / "o5")
    # a prompt longer than the model's context (256 tokens) is skipped and counted, the others are generated
    long_file = tmp_path / "long.txt"
    long_file.write_text("a red circle\n" + "x " * 300 + "\n")
    record = t2i(release, tmp_path / "o6", "--prompts", str(long_file), *ONE_DEVICE)
    assert [s["index"] for s in record["skipped"]] == [1] and "the model takes 256" in record["skipped"][0]["reason"]
    assert sorted(pngs(tmp_path / "o6")) == ["00000_00.png"]
    with pytest.raises(cli.UserError, match="expected one subcommand"):
        sample.run(["t2v", "--model", release])


def test_cli_one_line_error_and_exit_status(release, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "blip3o_jax.sample", "t2i", "--model", release, "--prompt", "a cat",
                           "--out", str(tmp_path / "o"), "--resolution", "30"], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --resolution 30 is not a positive multiple of 8, the decoder's VAE downsampling factor"]
    assert not os.path.exists(tmp_path / "o")


# ---- PyTorch composition of the same weights (the original's inference path)


class TorchNextDiTCrossAttn(torch.nn.Module):
    """The original's `NextDiTCrossAttn` from diffusers layers: caption projection + LuminaNextDiT2DModel."""

    def __init__(self, cfg):
        from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
        from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel

        super().__init__()
        self.caption_projection = PixArtAlphaTextProjection(cfg["latent_embedding_size"], cfg["dim"])
        self.model = LuminaNextDiT2DModel(
            sample_size=cfg["input_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
            hidden_size=cfg["dim"], num_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
            num_kv_heads=cfg["n_kv_heads"], multiple_of=cfg["multiple_of"], ffn_dim_multiplier=None,
            norm_eps=cfg["norm_eps"], learn_sigma=False, qk_norm=cfg["qk_norm"], cross_attention_dim=cfg["dim"])
        self.freqs_cis = get_2d_rotary_pos_embed_lumina(cfg["dim"] // cfg["n_heads"], 384, 384)

    def forward(self, x, timestep, cond):
        mask = torch.ones(cond.shape[:2], dtype=torch.int64)
        return self.model(x, timestep, self.caption_projection(cond), mask, self.freqs_cis,
                          cross_attention_kwargs={}).sample


class TorchBlip3o:
    """The release's weights in transformers' Qwen2.5-VL, the DiT above and diffusers' UNet/VAE/Euler scheduler,
    run as the original's `generate_image` + `pipeline_llava_gen` (batch 1, fp32)."""

    def __init__(self, release):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from blip3o_jax.convert.common import iter_safetensors

        torch.set_num_threads(2)
        hf = json.load(open(os.path.join(release, "config.json")))
        text = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                                   "rope_scaling", "max_position_embeddings", "bos_token_id", "eos_token_id")}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=hf["vision_config"], tie_word_embeddings=True,
                                  **{k: hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                        "vision_end_token_id")})
        self.vl = Qwen2_5_VLForConditionalGeneration(config).eval()
        sd = {k: torch.from_numpy(v.astype(np.float32))
              for k, v in iter_safetensors(os.path.join(release, "model.safetensors"))}
        vl_sd = {("model." + k if k.startswith("visual.") else "model.language_model." + k[len("model."):]): v
                 for k, v in sd.items() if k.startswith(("visual.", "model.layers.", "model.embed_tokens.",
                                                         "model.norm."))}
        missing, unexpected = self.vl.load_state_dict(vl_sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        self.vl.tie_weights()
        self.queries = sd["model.latent_queries"]
        self.dit_cfg = {**hf["dit_config"], "latent_embedding_size": hf["hidden_size"]}
        self.dit = TorchNextDiTCrossAttn(self.dit_cfg).eval()
        dit_sd = {k[len("model.dit.model."):]: v for k, v in sd.items() if k.startswith("model.dit.model.")}
        self.dit.caption_projection.load_state_dict(
            {k[len("caption_projection."):]: v for k, v in dit_sd.items() if k.startswith("caption_projection.")})
        missing, unexpected = self.dit.model.load_state_dict(
            {k: v for k, v in dit_sd.items() if not k.startswith("caption_projection.")}, strict=False)
        assert not unexpected and missing == ["pad_token"], (missing, unexpected)
        dec = os.path.join(release, "diffusion-decoder")

        def part(cls, name):
            model = cls.from_config(json.load(open(os.path.join(dec, name, "config.json"))))
            model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in iter_safetensors(
                os.path.join(dec, name, "diffusion_pytorch_model.bf16.safetensors"))})
            return model.eval()

        self.unet, self.vae = part(UNet2DConditionModel, "unet"), part(AutoencoderKL, "vae")
        self.scheduler_config = json.load(open(os.path.join(dec, "scheduler", "scheduler_config.json")))

    @torch.no_grad()
    def query_states(self, ids):
        """The original's `generate_image` LLM pass: embed the prompt (ending in [IMG]), append the latent queries,
        take the last hidden layer at the query positions."""
        lm = self.vl.model.language_model
        embeds = torch.cat([lm.embed_tokens(torch.from_numpy(np.asarray(ids))[None]), self.queries], dim=1)
        return lm(inputs_embeds=embeds).last_hidden_state[:, -self.queries.shape[1]:]

    @torch.no_grad()
    def dit_sample(self, cond, noise_nhwc, steps, guidance):
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
        x = torch.from_numpy(np.array(noise_nhwc)).permute(0, 3, 1, 2)
        cond_in = torch.cat([torch.zeros_like(cond), cond])
        for t in sched.timesteps:
            v = self.dit(torch.cat([x, x]), t.expand(2).to(torch.long), cond_in)
            v_uncond, v_cond = v.chunk(2)
            x = sched.step(v_uncond + guidance * (v_cond - v_uncond), t, x).prev_sample
        return x.flatten(2).transpose(1, 2)  # (1, g*g, C), row-major

    @torch.no_grad()
    def decode(self, features, negative, noise_nhwc, steps, guidance, size):
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(steps)
        prompt_embeds = torch.cat([features, negative])  # [cond, uncond] as pipeline_llava_gen
        text_embeds = prompt_embeds.mean(dim=1)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        x = torch.from_numpy(np.array(noise_nhwc)).permute(0, 3, 1, 2) * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = self.unet(sched.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=prompt_embeds,
                            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
            eps_cond, eps_uncond = eps.chunk(2)
            x = sched.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, x).prev_sample
        image = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return np.round((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0] * 255).astype(np.uint8)


def jax_noise(seed, index, k, shape, stream):
    """The initial noise our sampler draws for image k of item `index` (its `_row_noise`, run eagerly)."""
    return np.asarray(sample._row_noise(np.uint32(seed), np.asarray([index], np.uint32), np.asarray([k], np.uint32),
                                        shape, stream))


def test_t2i_pixels_and_i2t_tokens_match_the_pytorch_composition(release, images, tmp_path):
    """The issue's end-to-end check: same weights, same initial noise, the original's composition in PyTorch
    (chatml prompt as its inference script, negative = the DiT's sample for the untemplated empty prompt)."""
    ref = TorchBlip3o(release)
    tok = sample._tokenizer(release)
    from blip3o_jax.data import prompts

    steps, seed, size = 4, 0, 32
    out = tmp_path / "ours"
    t2i(release, out, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt_format", "chatml", *ONE_DEVICE)
    ours = pngs(out)
    nq, grid = ref.queries.shape[1], (ref.dit_cfg["input_size"],) * 2 + (ref.dit_cfg["in_channels"],)
    ids_special = prompts.special_ids(tok)
    negative = ref.dit_sample(ref.query_states([ids_special.image_start]),
                              jax_noise(seed, sample.NEGATIVE_INDEX, 0, grid, 0), steps, 3.0)
    errors = []
    for i, caption in enumerate(PROMPTS[:2]):
        ids = prompts.t2i_prompt_ids(tok, caption, nq, prompt_format="chatml")[:-nq]  # ... [IMG]
        features = ref.dit_sample(ref.query_states(ids), jax_noise(seed, i, 0, grid, 0), steps, 3.0)
        pixels = ref.decode(features, negative, jax_noise(seed, i, 0, (size // 8, size // 8, 4), 1), steps, 3.0,
                            size)
        diff = np.abs(ours[f"{i:05d}_00.png"].astype(int) - pixels)
        errors.append((diff.mean(), diff.max()))
        assert pixels.std() > 5
    # the comparison can fail: the decoder's negative matters (zeros instead of the DiT's empty-prompt sample)
    zeros = ref.decode(features, torch.zeros_like(negative), jax_noise(seed, 1, 0, (size // 8, size // 8, 4), 1),
                       steps, 3.0, size)
    assert np.abs(ours["00001_00.png"].astype(int) - zeros).mean() > 1
    print(f"[parity] t2i vs PyTorch: mean |diff| {max(e[0] for e in errors):.3f}, max {max(e[1] for e in errors)} "
          "grey levels")
    assert max(e[0] for e in errors) <= 1.0

    # image -> text: greedy tokens of transformers' generate on the same prompt and patches
    answers = tmp_path / "answers.jsonl"
    sample.run(["i2t", "--model", release, "--images", str(images / "*.png"), "--question", QUESTION,
                "--out", str(answers), "--max_new_tokens", "6", "--batch", "2", "--progress=false"])
    from blip3o_jax import preprocessing

    reader = sample.load_reader(release, "float32")
    for row in map(json.loads, open(answers)):
        with preprocessing.open_image(row["image"]) as img:
            patches, grid_thw = preprocessing.qwen2_5_vl_preprocess(img, min_pixels=56 * 56, max_pixels=112 * 112)
        ids = np.asarray([sample._understanding_prompt(reader, row["question"], int(np.prod(grid_thw)) // 4,
                                                       "You are a helpful assistant.")])
        image_slots = (ids == reader.module.cfg.image_token_id).astype(np.int64)
        with torch.no_grad():
            new = ref.vl.generate(
                input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                pixel_values=torch.from_numpy(patches), image_grid_thw=torch.from_numpy(grid_thw[None]),
                mm_token_type_ids=torch.from_numpy(image_slots), max_new_tokens=6, do_sample=False,
                eos_token_id=list(reader.eos_ids), pad_token_id=reader.pad_id)[0, ids.shape[1]:].numpy()
        stop = next((j for j, t in enumerate(new) if int(t) in reader.eos_ids), len(new))
        assert tok.decode(new[:stop], skip_special_tokens=True).strip() == row["prediction"], row


def test_t2i_mesh_shards_the_weights(release, prompt_file, uninterrupted, tmp_path):
    """--mesh data=2,fsdp=4: the weights sharded over fsdp by their logical axes (as the trainer shards them), the
    batch over data x fsdp; the same pixels as the default replicated run, within one grey level where XLA's
    reductions differ with the sharding (how many PNGs are byte-identical is printed)."""
    record = t2i(release, tmp_path / "fsdp", "--prompts", prompt_file, "--num_images_per_prompt", "2", "--batch", "8",
                 "--mesh", "fsdp=4")  # data takes the devices left over: data=2
    assert record["devices"] == 8 and record["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    ref, got = pngs(uninterrupted[0]), pngs(tmp_path / "fsdp")
    assert sorted(got) == sorted(ref)
    diffs = {f: int(np.abs(got[f].astype(int) - ref[f]).max()) for f in ref}
    same = sum(open(tmp_path / "fsdp" / f, "rb").read() == open(os.path.join(uninterrupted[0], f), "rb").read()
               for f in ref)
    print(f"[mesh] data=2,fsdp=4 vs replicated batch 3: {same}/{len(ref)} PNGs byte-identical, max diff "
          f"{max(diffs.values())}")
    assert max(diffs.values()) <= 1, diffs

    # the weights the run used really are split: each device holds a quarter of the LLM's embedding table, of the
    # DiT's and of the UNet's large matrices (the model width on fsdp), and the whole of nothing large
    devices = sample.local_devices(None, "fsdp=4")
    gen = sample.placed_generator(sample.load_generator(release, "sdxl", "float32", None), devices)
    embed = gen.params["backbone"]["embed_tokens"]["embedding"]
    assert embed.sharding.spec[1] == "fsdp"  # ("vocab", "embed") -> (tensor, fsdp)
    assert embed.addressable_shards[0].data.shape == (embed.shape[0], embed.shape[1] // 4)
    for name, tree in (("llm", gen.params["backbone"]), ("dit", gen.params["dit"]),
                       ("unet", gen.decoder.unet_params)):
        leaves = [x for x in jax_leaves(tree) if x.size >= 4096]
        split = [x for x in leaves if "fsdp" in str(x.sharding.spec)]
        assert leaves and len(split) >= 0.5 * len(leaves), (name, len(split), len(leaves))
    # the default mesh keeps every weight whole on every device
    plain = sample.placed_generator(gen, sample.local_devices(None))
    assert all(x.sharding.is_fully_replicated for x in jax_leaves(plain.params))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_mesh_flag_parsing():
    assert sample.parse_mesh(None) == {"data": -1}
    assert sample.parse_mesh("fsdp=4") == {"fsdp": 4, "data": -1}
    assert sample.parse_mesh("data=2,fsdp=-1") == {"data": 2, "fsdp": -1}
    assert sample.parse_mesh("tensor=-1") == {"tensor": -1}
    with pytest.raises(ValueError, match="--mesh 'fsdp4'"):
        sample.parse_mesh("fsdp4")
    with pytest.raises(cli.UserError, match="--mesh data=3"):
        sample.local_devices(None, "data=3")  # 8 devices do not split into 3 rows
    devices = sample.local_devices(None, "tensor=2")
    assert devices.batch_parallel == 4 and devices.shards_weights and devices.round_batch(5) == 8
