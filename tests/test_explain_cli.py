"""`glass-diffusion explain` (nodes/cli_explain.py): attention maps and the step film from the command line."""
from PIL import Image

from glass_diffusion.nodes import cli


def test_explain_writes_the_picture_and_one_heat_map_per_chosen_word(tmp_path, capsys):
    rc = cli.main(["explain", "a small yellow triangle at the top left on a black background", "--words",
                   "triangle,black", "--steps", "2", "--output", str(tmp_path), "--device", "cpu"])
    assert rc == cli.OK
    printed = capsys.readouterr().out.split()
    names = sorted(p.name for p in (tmp_path / "attention").iterdir())
    assert names == ["heatmap_00001_.png", "heatmap_00002_.png", "picture_00001_.png"]
    assert sorted(printed) == sorted(str(tmp_path / "attention" / n) for n in names)


def test_explain_refuses_a_word_not_in_the_prompt(tmp_path, capsys):
    rc = cli.main(["explain", "a red circle", "--words", "square", "--steps", "1", "--output", str(tmp_path),
                   "--device", "cpu"])
    assert rc != cli.OK and "'square' is not a word of the prompt" in capsys.readouterr().err
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_explain_film_saves_an_animation_and_the_frames(tmp_path):
    rc = cli.main(["explain", "--film", "--format", "gif", "--steps", "3", "--output", str(tmp_path),
                   "--device", "cpu"])
    assert rc == cli.OK
    files = sorted(p.name for p in (tmp_path / "film").iterdir())
    assert files == ["frame_00001_.png", "frame_00002_.png", "frame_00003_.png", "step_film_00001_.gif"]
    with Image.open(tmp_path / "film" / "step_film_00001_.gif") as im:
        assert im.n_frames == 3
