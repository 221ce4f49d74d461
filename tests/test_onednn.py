"""Channel fine-tunings start without oneDNN, which crashed on them; everything else keeps it."""

from __future__ import annotations

from src import onednn


def test_only_channel_fine_tuning_turns_onednn_off_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(onednn.ENV, raising=False)
    assert onednn.child_env("channel", 3) == {onednn.ENV: "0"}
    assert onednn.child_env("channel", 0) == {} and onednn.child_env("flat", 3) == {}
    assert "TF_ENABLE_ONEDNN_OPTS=0" in onednn.warning("channel", 3)
    assert onednn.warning("flat", 3) is None
    monkeypatch.setenv(onednn.ENV, "1")  # the user's choice wins
    assert onednn.child_env("channel", 3) == {}
    monkeypatch.setenv(onednn.ENV, "0")
    assert onednn.warning("channel", 3) is None
