"""The bookkeeping that keeps a resume and the end of a run independent of how many samples
earlier runs finished: the shard index read without decoding records, the key digest, and the
decision to append to records.jsonl or rewrite it."""

import json
import os
from pathlib import Path

import pytest
import torch

from ntrk_lightning.fileio import json_safe
from ntrk_lightning.pipeline import layout, records_file

ODD_PROMPTS = ["", "a cat", 'say "hi"', "back\\slash", "line\nbreak", "ünïcödé ✓", "\t", "{}[],:",
               # a prompt that spells the field separators the fast reader anchors on
               '", "sample_index": 0, "seed": 1, "image": "x.png", "files": [1, 2, 3, 4]}']


def _line(arm, p, s, prompt, sig=(11, 22, 33, 44), sha=True, **over):
    rec = layout.build_record(arm, p, prompt, s, 123456789012345678, {"name": "ntrk", "rho": 0.5}, 25,
                              {"reward": 1.5, "judge": None}, 25, 24, 0, 0.01, 0)
    if sha:
        rec["png_bytes"], rec["png_sha256"] = 100, "ab" * 32
    rec.update(over)
    return layout.shard_line(json.dumps(json_safe(rec)), sig).rstrip("\n")


@pytest.mark.parametrize("p", range(len(ODD_PROMPTS)))
def test_fast_shard_reader_agrees_with_json_on_writer_lines(p):
    """Every line the writer writes is read by the string-method path (not decoded), with the same
    entry a JSON decode gives, whatever the prompt holds."""
    prompt_json = [json.dumps(x) for x in ODD_PROMPTS]
    for arm, s in (("ntrk", 0), ("plain-2.b", 123456)):
        line = _line(arm, p, s, ODD_PROMPTS[p])
        fast = layout._index_fast(line, "src", prompt_json)
        assert fast is not None, line
        assert fast == layout._index_decoded(line, "src", ODD_PROMPTS)
        key, entry = fast
        assert key == (arm, p, s) and entry.consistent and entry.signature == "11, 22, 33, 44"
        assert entry.png_sha256 == "ab" * 32 and entry.image == str(layout.image_path(Path("."), arm, p, s))


def test_fast_shard_reader_flags_lines_that_do_not_describe_their_sample():
    prompt_json = [json.dumps(x) for x in ODD_PROMPTS]
    cases = {
        "other prompt": _line("a", 1, 0, "a dog"),
        "prompt index beyond the list": _line("a", len(ODD_PROMPTS), 0, ""),
        "record names another prompt index": _line("a", 1, 0, "a cat", prompt_index=2),
        "record names another sample": _line("a", 1, 0, "a cat", sample_index=7),
    }
    for why, line in cases.items():
        fast = layout._index_fast(line, "src", prompt_json)
        entry = (fast or layout._index_decoded(line, "src", ODD_PROMPTS))[1]
        assert not entry.consistent, why
        assert not layout._index_decoded(line, "src", ODD_PROMPTS)[1].consistent, why


def test_lines_in_another_form_are_decoded_not_misread():
    prompt_json = [json.dumps(x) for x in ODD_PROMPTS]
    rec = json.loads(_line("a", 1, 3, "a cat"))
    reordered = json.dumps(dict(reversed(list(rec.items()))))  # same content, other field order
    assert layout._index_fast(reordered, "src", prompt_json) is None
    key, entry = layout._index_decoded(reordered, "src", ODD_PROMPTS)
    assert key == ("a", 1, 3) and entry.consistent and entry.signature == "11, 22, 33, 44"
    no_sha = _line("a", 1, 3, "a cat", sha=False)
    assert layout._index_fast(no_sha, "src", prompt_json)[1].png_sha256 is None
    unsigned = json.dumps(json.loads(no_sha) | {"files": "damaged"})
    assert layout._index_decoded(unsigned, "src", ODD_PROMPTS)[1].signature is None
    assert layout._index_decoded('{"arm": "a", "key": "a/p00001_s00', "src", ODD_PROMPTS) is None  # a kill's cut line


def test_read_shard_index_later_shards_win_and_cut_lines_are_skipped(tmp_path):
    folder = tmp_path / layout.RECORD_SHARDS
    folder.mkdir()
    (folder / "20260101T000000-aaaa.rank00000.jsonl").write_text(
        _line("a", 0, 0, "", sig=(1, 1, 1, 1)) + "\n" + _line("a", 0, 1, "") + "\n")
    (folder / "20260102T000000-bbbb.rank00000.jsonl").write_text(
        _line("a", 0, 0, "", sig=(2, 2, 2, 2)) + "\n" + _line("a", 0, 2, "")[:50])
    index = layout.read_shard_index(tmp_path, [""])
    assert set(index) == {("a", 0, 0), ("a", 0, 1)}
    assert index[("a", 0, 0)].signature == "2, 2, 2, 2" and index[("a", 0, 0)].source.startswith("20260102")


def test_key_digest_is_order_free_additive_and_tells_sets_apart():
    keys = [("a", p, s) for p in range(3) for s in range(50)]
    d = records_file.key_digest(keys)
    assert d == records_file.key_digest(reversed(keys))
    assert d == (records_file.key_digest(keys[:70]) + records_file.key_digest(keys[70:])) % (1 << 64)
    assert d != records_file.key_digest(keys[:-1] + [("a", 3, 0)])   # one key swapped
    assert d != records_file.key_digest(keys[:-1] + [("b", 2, 49)])  # same indices, other arm
    assert records_file.key_hash(("a", 1, 2)) == records_file.key_hash(("a", 1, 2))


def test_plan_appends_only_when_records_jsonl_holds_exactly_the_earlier_samples():
    def texts(keys):
        return {k: records_file.key_text(k) for k in keys}

    base = [("a", 0, s) for s in range(10)]
    fresh = [("a", 0, 10), ("a", 0, 11)]
    synced = records_file.Synced(10, records_file.key_digest(base), "shard0")
    plan = records_file.plan(synced, texts(base + fresh), fresh)
    assert plan.append and plan.fresh == fresh and plan.count == 12
    assert plan.digest == records_file.key_digest(base + fresh)
    assert records_file.key_text(("a", 3, 7)) == layout.key("a", 3, 7)
    assert not records_file.plan(synced, texts(base[:-1] + fresh), fresh).append       # a finished sample gone
    assert not records_file.plan(synced, texts(base[:-1] + [("a", 0, 99)]), []).append  # same count, other set
    assert not records_file.plan(None, texts(base), []).append                          # no index
    assert not records_file.plan(synced, texts(base + fresh), []).append                # unknown extra samples


def test_read_synced_notices_a_changed_records_jsonl(tmp_path):
    layout.write_records_jsonl(tmp_path, ['{"x": 1}', '{"x": 2}'])
    records_file.write_index(tmp_path, 2, 7)
    assert records_file.read_synced(tmp_path) == records_file.Synced(2, 7, None)
    records_file.append_lines(tmp_path, ['{"x": 3}'])
    assert records_file.read_synced(tmp_path) is None  # size changed: not the indexed file
    records_file.write_index(tmp_path, 3, 8)
    st = os.stat(tmp_path / layout.RECORDS)
    os.utime(tmp_path / layout.RECORDS, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert records_file.read_synced(tmp_path) is None  # rewritten with the same size
    (tmp_path / layout.RECORDS_INDEX).write_text("{")
    assert records_file.read_synced(tmp_path) is None


def test_sample_costs_state_sums_and_merges():
    from metrics import COST_FIELDS, SampleCosts

    a, b = SampleCosts(), SampleCosts()
    a.update({f: torch.tensor([1.0, 2.0]) for f in COST_FIELDS})
    b.update({f: torch.tensor([4.0]) for f in COST_FIELDS})
    a.merge_state(b.metric_state)
    out = a.compute()
    assert out["count"] == 3 and out["sum"]["nfe"] == 7.0 and out["mean"]["seconds"] == pytest.approx(7 / 3)
    with pytest.warns(UserWarning):  # torchmetrics: compute before update
        assert SampleCosts().compute()["mean"]["nfe"] is None
    with pytest.raises(ValueError, match="different lengths"):
        SampleCosts().update({**{f: torch.ones(2) for f in COST_FIELDS}, "nfe": torch.ones(3)})
    with pytest.raises(ValueError, match="missing"):
        SampleCosts().update({"nfe": torch.ones(2)})
