"""Tokenizer parity with transformers' CLIPTokenizer built from the same vocabulary (the SD1.5 settings:
padding="max_length", max_length=77, truncation=True).

transformers 5.x's CLIPTokenizer is the `tokenizers`-backed one (CLIPTokenizerFast is the same class) and never
runs ftfy, so the oracle is independent of whether ftfy is installed (it is not, and is not needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import require_oracle

from animatediff_lite.tokenizer import (
    NUM_MERGES,
    VOCAB_ASSET,
    Tokenizer,
    _read_asset,
    byte_alphabet,
    parse_merges,
    vocab_from_merges,
)

transformers = require_oracle("transformers")

# Every prompt and negative prompt of the AnimateDiff model zoo configs (mmagic README), deduplicated.
README_PROMPTS = [
    ('best quality, masterpiece, 1girl, looking at viewer, blurry background, upper body, contemporary, '
     'dress'),
    ('masterpiece, best quality, 1girl, solo, cherry blossoms, hanami, pink flower, white flower, spring '
     'season, wisteria, petals, flower, plum blossoms, outdoors, falling petals, white hair, black eyes,'),
    'best quality, masterpiece, 1boy, formal, abstract, looking at viewer, masculine, marble pattern',
    'best quality, masterpiece, 1girl, cloudy sky, dandelion, contrapposto, alternate hairstyle,',
    '',
    ('badhandv4,easynegative,ng_deepnegative_v1_75t,verybadimagenegative_v1.3, bad-artist, '
     'bad_prompt_version2-neg, teeth'),
    ('dark shot, epic realistic, portrait of halo, sunglasses, blue eyes, tartan scarf, white hair by atey'
     ' ghailan, by greg rutkowski, by greg tocchini, by james gilleard, by joe fenton, by kaethe butcher, '
     'gradient yellow, black, brown and magenta color scheme, grunge aesthetic!!! graffiti tag wall '
     'background, art by greg rutkowski and artgerm, soft cinematic light, adobe lightroom, photolab, hdr,'
     ' intricate, highly detailed, depth of field, faded, neutral colors, hdr, muted colors, '
     'hyperdetailed, artstation, cinematic, warm lights, dramatic light, intricate details, complex '
     'background, rutkowski, teal and orange'),
    ('A forbidden castle high up in the mountains, pixel art, intricate details2, hdr, intricate details, '
     'hyperdetailed5, natural skin texture, hyperrealism, soft light, sharp, game art, key visual, surreal'),
    ('dark theme, medieval portrait of a man sharp features, grim, cold stare, dark colors, Volumetric '
     'lighting, baroque oil painting by Greg Rutkowski, Artgerm, WLOP, Alphonse Mucha dynamic lighting '
     'hyperdetailed intricately detailed, hdr, muted colors, complex background, hyperrealism, '
     'hyperdetailed, amandine van ray'),
    ('As I have gone alone in there and with my treasures bold, I can keep my secret where and hint of '
     'riches new and old. Begin it where warm waters halt and take it in a canyon down, not far but too '
     'far to walk, put in below the home of brown.'),
    ('3d, cartoon, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer '
     'digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, '
     'username, blurry, artist name, young, loli, elf, 3d, illustration'),
    ('3d, cartoon, anime, sketches, worst quality, low quality, normal quality, lowres, normal quality, '
     'monochrome, grayscale, skin spots, acnes, skin blemishes, bad anatomy, girl, loli, young, large '
     'breasts, red eyes, muscular'),
    ('dof, grayscale, black and white, bw, 3d, cartoon, anime, sketches, worst quality, low quality, '
     'normal quality, lowres, normal quality, monochrome, grayscale, skin spots, acnes, skin blemishes, '
     'bad anatomy, girl, loli, young, large breasts, red eyes, muscular,badhandsv5-neg, By bad artist -neg'
     ' 1, monochrome'),
    ('holding an item, cowboy, hat, cartoon, 3d, disfigured, bad art, deformed,extra limbs,close up,b&w, '
     'weird colors, blurry, duplicate, morbid, mutilated, [out of frame], extra fingers, mutated hands, '
     'poorly drawn hands, poorly drawn face, mutation, deformed, ugly, blurry, bad anatomy, bad '
     'proportions, extra limbs, cloned face, disfigured, out of frame, ugly, extra limbs, bad anatomy, '
     'gross proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, mutated '
     'hands, fused fingers, too many fingers, long neck, Photoshop, video game, ugly, tiling, poorly drawn'
     ' hands, poorly drawn feet, poorly drawn face, out of frame, mutation, mutated, extra limbs, extra '
     'legs, extra arms, disfigured, deformed, cross-eye, body out of frame, blurry, bad art, bad anatomy, '
     '3d render'),
    ('Jane Eyre with headphones, natural skin texture,4mm,k textures, soft cinematic light, adobe '
     'lightroom, photolab, hdr, intricate, elegant, highly detailed, sharp focus, cinematic look, soothing'
     ' tones, insane details, intricate details, hyperdetailed, low contrast, soft cinematic light, dim '
     'colors, exposure blend, hdr, faded'),
    ('close up Portrait photo of muscular bearded guy in a worn mech suit, light bokeh, intricate, steel '
     'metal [rust], elegant, sharp focus, photo by greg rutkowski, soft lighting, vibrant colors, '
     'masterpiece, streets, detailed face'),
    ('absurdres, photorealistic, masterpiece, a 30 year old man with gold framed, aviator reading glasses '
     'and a black hooded jacket and a beard, professional photo, a character portrait, altermodern, '
     'detailed eyes, detailed lips, detailed face, grey eyes'),
    ('a golden labrador, warm vibrant colours, natural lighting, dappled lighting, diffused lighting, '
     'absurdres, highres,k, uhd, hdr, rtx, unreal, octane render, RAW photo, photorealistic, global '
     'illumination, subsurface scattering'),
    ('deformed, distorted, disfigured, poorly drawn, bad anatomy, wrong anatomy, extra limb, missing limb,'
     ' floating limbs, mutated hands and fingers, disconnected limbs, mutation, mutated, ugly, disgusting,'
     ' blurry, amputation'),
    ('nude, cross eyed, tongue, open mouth, inside, 3d, cartoon, anime, sketches, worst quality, low '
     'quality, normal quality, lowres, normal quality, monochrome, grayscale, skin spots, acnes, skin '
     'blemishes, bad anatomy, red eyes, muscular'),
    ('easynegative, cartoon, anime, sketches, necklace, earrings worst quality, low quality, normal '
     'quality, bad anatomy, bad hands, shiny skin, error, missing fingers, extra digit, fewer digits, jpeg'
     ' artifacts, signature, watermark, username, blurry, chubby, anorectic, bad eyes, old, wrinkled skin,'
     ' red skin, photograph By bad artist -neg, big eyes, muscular face,'),
    ('beard, EasyNegative, lowres, chromatic aberration, depth of field, motion blur, blurry, bokeh, bad '
     'quality, worst quality, multiple arms, badhand'),
    '1girl, offshoulder, light smile, shiny skin best quality, masterpiece, photorealistic',
    'best quality, masterpiece, photorealistic, 1boy, 50 years old beard, dramatic lighting',
    ('best quality, masterpiece, photorealistic, 1girl, light smile, shirt with collars, waist up, '
     'dramatic lighting, from below'),
    ('male, man, beard, bodybuilder, skinhead,cold face, tough guy, cowboyshot, tattoo, french windows, '
     'luxury hotel masterpiece, best quality, photorealistic'),
    ('ng_deepnegative_v1_75t, badhandv4, worst quality, low quality, normal quality, lowres, bad anatomy, '
     'bad hands, watermark, moles'),
    ('nsfw, ng_deepnegative_v1_75t,badhandv4, worst quality, low quality, normal quality, '
     'lowres,watermark, monochrome'),
    ('nude, nsfw, ng_deepnegative_v1_75t, badhandv4, worst quality, low quality, normal quality, lowres, '
     'bad anatomy, bad hands, monochrome, grayscale watermark, moles, people'),
    ('b&w photo of 42 y.o man in black clothes, bald, face, half body, body, high detailed skin, skin '
     'pores, coastline, overcast weather, wind, waves, 8k uhd, dslr, soft lighting, high quality, film '
     'grain, Fujifilm XT3'),
    ('close up photo of a rabbit, forest, haze, halation, bloom, dramatic atmosphere, centred, rule of '
     'thirds, 200mm 1.4f macro shot'),
    ('photo of coastline, rocks, storm weather, wind, waves, lightning, 8k uhd, dslr, soft lighting, high '
     'quality, film grain, Fujifilm XT3'),
    ('night, b&w photo of old house, post apocalypse, forest, storm weather, wind, rocks, 8k uhd, dslr, '
     'soft lighting, high quality, film grain'),
    ('semi-realistic, cgi, 3d, render, sketch, cartoon, drawing, anime, text, close up, cropped, out of '
     'frame, worst quality, low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra '
     'fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, deformed, blurry, '
     'dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, gross proportions, '
     'malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, too many '
     'fingers, long neck'),
    ('blur, haze, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, '
     'drawing, anime, mutated hands and fingers, deformed, distorted, disfigured, poorly drawn, bad '
     'anatomy, wrong anatomy, extra limb, missing limb, floating limbs, disconnected limbs, mutation, '
     'mutated, ugly, disgusting, amputation'),
    ('blur, haze, deformed iris, deformed pupils, semi-realistic, cgi, 3d, render, sketch, cartoon, '
     'drawing, anime, art, mutated hands and fingers, deformed, distorted, disfigured, poorly drawn, bad '
     'anatomy, wrong anatomy, extra limb, missing limb, floating limbs, disconnected limbs, mutation, '
     'mutated, ugly, disgusting, amputation'),
]

EDGE_CASES = [
    "",
    " ",
    "a corgi running",
    "A Corgi RUNNING On The BEACH",
    "hello, world!!! ... ?!?! (((masterpiece))) [out of frame] {x} <y> a|b a/b a\\b",
    "1234567890 3.14159 1,000,000 42nd 8k 4K uhd",
    "  leading and   repeated   spaces  ",
    "tabs\tand\nnew\r\nlines\u00a0nbsp\u3000ideographic space",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 Stra\u00dfe \u00c5ngstr\u00f6m",
    "cafe\u0301 decomposed accent",  # NFC composes it
    "\u6771\u4eac\u30bf\u30ef\u30fc \u5317\u4eac \uc11c\uc6b8",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "emoji \U0001f436\U0001f525\u2728 \U0001f468\u200d\U0001f469\u200d\U0001f467 flags \U0001f1ef\U0001f1f5",
    "don't won't it's we're they've I'm you'll he'd DON'T It'S",
    "quotes \u2018curly\u2019 \u201cdouble\u201d `back` 'single'",
    "&amp; &lt;html&gt; b&w",
    "<|startoftext|>a<|endoftext|>b",
    "<|EndOfText|> written in another case",
    "\u00bd \u2153 \u2460 \u00b2 \uff11\uff12 fullwidth \uff21\uff22",
    "zero\u200bwidth\u200cjoiner soft\u00adhyphen",
    "word " * 100,
    "supercalifragilisticexpialidocious" * 20,
    "a, " * 80,
]


def _write_vocab_files(folder) -> tuple[str, str]:
    merges = parse_merges(_read_asset(VOCAB_ASSET), limit=NUM_MERGES)
    vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
    vocab_json.write_text(json.dumps(vocab_from_merges(merges), ensure_ascii=False), encoding="utf-8")
    merges_txt.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return str(vocab_json), str(merges_txt)


def _oracle_classes() -> list:
    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not transformers.CLIPTokenizer:
        classes.append(fast)
    return classes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _write_vocab_files(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module", params=_oracle_classes(), ids=lambda c: c.__name__)
def oracle(request, files):
    # from_pretrained on the folder, as SD1.5 pipelines load it (transformers 5 ignores vocab_file=/merges_file=).
    folder = Path(files[0]).parent
    tok = request.param.from_pretrained(str(folder))
    assert tok.vocab_size == 49408
    return tok


def _reference_ids(oracle, texts: list[str]) -> torch.Tensor:
    return oracle(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _compare(ours_ids: torch.Tensor, ref_ids: torch.Tensor, texts: list[str]) -> None:
    assert ours_ids.dtype == torch.long
    assert ours_ids.shape == ref_ids.shape == (len(texts), 77)
    bad = (ours_ids != ref_ids).any(dim=1).nonzero().flatten().tolist()
    detail = [(texts[i][:60], (ours_ids[i] != ref_ids[i]).nonzero().flatten()[:5].tolist()) for i in bad[:5]]
    assert not bad, f"{len(bad)} of {len(texts)} prompts differ (prompt, first differing positions): {detail}"


def test_vocabulary_layout(ours):
    alphabet = byte_alphabet()
    assert len(alphabet) == len(set(alphabet)) == 256
    assert alphabet[0] == "!" and alphabet[-1] == chr(256 + 67)  # 188 printable bytes, 68 remapped
    assert ours.vocab_size == 49408
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.max_length) == (49406, 49407, 49407, 77)


@pytest.mark.parametrize("text", EDGE_CASES + README_PROMPTS, ids=lambda t: repr(t[:24]))
def test_matches_transformers(ours, oracle, text):
    _compare(ours(text), _reference_ids(oracle, [text]), [text])


def test_batch_matches_transformers(ours, oracle):
    texts = EDGE_CASES + README_PROMPTS
    _compare(ours(texts), _reference_ids(oracle, texts), texts)


def test_truncation_keeps_eos_last(ours):
    ids = ours(["word " * 100, "a photo"])
    assert ids[0, 0] == ours.bos_id and ids[0, -1] == ours.eos_id
    assert (ids[0, 1:-1] != ours.eos_id).all()  # 75 content tokens, no padding
    assert ids[1, :4].tolist() == [ours.bos_id, *ours.encode("a photo"), ours.eos_id]
    assert (ids[1, 4:] == ours.pad_id).all()


def test_from_files_round_trip(ours, files, tmp_path):
    vocab_json, merges_txt = files
    loaded = Tokenizer.from_files(vocab_json, merges_txt)
    texts = EDGE_CASES + README_PROMPTS
    assert torch.equal(loaded(texts), ours(texts))
    assert ours.decode(ours("A Corgi, running!")[0]) == "a corgi , running !"


@pytest.mark.parametrize("bad", [[], (), ["ok", 3], [None]])
def test_bad_input_raises(ours, bad):
    with pytest.raises(ValueError, match="texts"):
        ours(bad)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(max_length=1)
    with pytest.raises(ValueError, match="vocab and merges"):
        Tokenizer(vocab={"a": 0})
    with pytest.raises(ValueError, match="<\\|startoftext"):
        Tokenizer(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])
