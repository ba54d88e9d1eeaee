"""megamm.checkpoint.blobs: one copy of the tokenizers per save directory."""
import os

from megamm.checkpoint import blobs, manifest


def _tokenizer_folder(root):
    (root / "image" / "model").mkdir(parents=True)
    (root / "text").mkdir()
    (root / "image" / "model" / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "image" / "megamm_tokenizer.json").write_text('{"kind": "hf_image"}')
    (root / "text" / "tokenizer.json").write_text('{"model": {}}')
    return root


def test_steps_share_one_copy_and_each_stays_complete(tmp_path):
    src = _tokenizer_folder(tmp_path / "tok")
    save = tmp_path / "save"
    save.mkdir()
    first = blobs.link_tree(src, save / "step1" / "tokenizers", save)
    second = blobs.link_tree(src, save / "step2" / "tokenizers", save)
    assert first == sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    assert second == 0  # nothing new to store
    big = [save / f"step{i}" / "tokenizers" / "image" / "model" / "model.safetensors" for i in (1, 2)]
    assert big[0].stat().st_ino == big[1].stat().st_ino and big[0].stat().st_nlink == 3  # store + 2 steps
    for i in (1, 2):
        step = save / f"step{i}"
        manifest.write(step, manifest.entries(step, manifest.list_files(step)))
        assert manifest.verify(step) is None
        assert sorted(p.relative_to(step / "tokenizers").as_posix() for p in (step / "tokenizers").rglob("*")
                      if p.is_file()) == ["image/megamm_tokenizer.json", "image/model/model.safetensors",
                                          "text/tokenizer.json"]
    assert (big[0].stat().st_mode & 0o777) == 0o444  # never edited in place: every step shares it


def test_a_changed_source_is_stored_again_and_pruning_frees_the_old_copy(tmp_path):
    import shutil

    src = _tokenizer_folder(tmp_path / "tok")
    save = tmp_path / "save"
    save.mkdir()
    blobs.link_tree(src, save / "step1" / "tokenizers", save)
    (src / "text" / "tokenizer.json").write_text('{"model": {"changed": 1}}')
    assert blobs.link_tree(src, save / "step2" / "tokenizers", save) == len('{"model": {"changed": 1}}')
    assert (save / "step2" / "tokenizers" / "text" / "tokenizer.json").read_text() == '{"model": {"changed": 1}}'
    assert (save / "step1" / "tokenizers" / "text" / "tokenizer.json").read_text() == '{"model": {}}'
    assert len([b for b in (save / blobs.STORE).iterdir() if b.name != blobs.INDEX]) == 4
    shutil.rmtree(save / "step1")
    gone = blobs.prune(save)
    assert len(gone) == 1  # the old text tokenizer; the shared files stay
    assert len([b for b in (save / blobs.STORE).iterdir() if b.name != blobs.INDEX]) == 3
    assert (save / "step2" / "tokenizers" / "image" / "model" / "model.safetensors").is_file()


def test_a_copy_of_a_checkpoint_elsewhere_needs_no_store(tmp_path):
    import shutil

    src = _tokenizer_folder(tmp_path / "tok")
    save = tmp_path / "save"
    save.mkdir()
    blobs.link_tree(src, save / "step1" / "tokenizers", save)
    step = save / "step1"
    manifest.write(step, manifest.entries(step, manifest.list_files(step)))
    shutil.copytree(step, tmp_path / "elsewhere")
    shutil.rmtree(save)
    assert manifest.verify(tmp_path / "elsewhere") is None
