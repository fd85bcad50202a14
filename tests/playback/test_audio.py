"""The resampler and sample decoding: pure, no I/O."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.audio import SAMPLE_RATES, StreamResampler, decode_samples, duration_samples

OUT = 48_000


def _tone(freq_hz: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(np.sin(2 * np.pi * freq_hz * t) * amplitude * 32767).astype(np.int16)


def _level_db(samples: np.ndarray, freq_hz: float, rate: int = OUT) -> float:
    """Peak level near ``freq_hz`` (dB re full scale), Hann window, edges trimmed."""
    x = samples[rate // 10 : -rate // 10].astype(np.float64) / 32767
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) / (len(x) / 4)
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    band = (freqs > freq_hz - 50) & (freqs < freq_hz + 50)
    return 20 * np.log10(spectrum[band].max() + 1e-12)


def _stream(samples: np.ndarray, rate: int, piece: int = 4800) -> np.ndarray:
    source = StreamResampler(samples, rate)
    out = []
    while not source.exhausted:
        out.append(source.read(piece))
    return np.concatenate(out)


def _vendor_linear(samples: np.ndarray, rate: int) -> np.ndarray:
    """The vendor page's resample_to_48k (np.interp), to show what the test catches."""
    n_out = int(len(samples) * OUT / rate)
    t_in = np.linspace(0, 1, len(samples), endpoint=False)
    t_out = np.linspace(0, 1, n_out, endpoint=False)
    return np.clip(np.interp(t_out, t_in, samples.astype(np.float32)), -32768, 32767).astype(np.int16)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 24000, 44100])
def test_tone_near_source_nyquist_does_not_alias_into_the_band(rate):
    """A tone at 85% of the source Nyquist keeps its level, and its mirror image
    about the source Nyquist (where a poor filter puts energy) stays 70 dB down."""
    nyquist = rate / 2
    freq = 0.85 * nyquist
    image = rate - freq  # the mirror above the source Nyquist...
    if image > OUT / 2:
        image = OUT - image  # ...folded back into the 48 kHz band when above 24 kHz
    out = _stream(_tone(freq, rate), rate)
    tone_db = _level_db(out, freq)
    assert tone_db > _level_db(_tone(freq, OUT), freq) - 1.0
    assert _level_db(out, image) < tone_db - 70
    # The vendor's linear interpolation fails the same check by a wide margin.
    linear = _vendor_linear(_tone(freq, rate), rate)
    assert _level_db(linear, image) > tone_db - 40


@pytest.mark.parametrize("rate", SAMPLE_RATES)
def test_length_is_exact_whatever_the_read_size(rate):
    samples = _tone(440, rate, seconds=1.37)
    expected = duration_samples(len(samples), rate)
    for piece in (1, 480, 4800, 100_000):
        if piece == 1 and rate != OUT:
            continue  # one sample at a time is slow and proves nothing more
        assert len(_stream(samples, rate, piece)) == expected


def test_pieces_join_without_clicks():
    """Chunked output equals the one-shot conversion within the filter's rounding."""
    import soxr

    samples = _tone(1000, 24000, seconds=2)
    whole = soxr.resample(samples, 24000, OUT, quality="HQ").astype(np.int32)
    chunked = _stream(samples, 24000).astype(np.int32)
    assert len(whole) == len(chunked)
    assert np.max(np.abs(whole - chunked)) <= 2


def test_48k_passes_through_untouched():
    samples = _tone(440, OUT, seconds=0.5)
    assert np.array_equal(_stream(samples, OUT), samples)


def test_decode_float32_and_pcm16():
    floats = np.array([0.0, 0.5, -1.0, 2.0, -3.0], dtype="<f4")
    assert decode_samples(floats.tobytes(), "float32").tolist() == [0, 16384, -32767, 32767, -32767]
    pcm = np.array([1, -2, 32767], dtype="<i2")
    assert decode_samples(pcm.tobytes(), "pcm16").tolist() == [1, -2, 32767]
    with pytest.raises(ValueError, match="NaN"):
        decode_samples(np.array([np.nan], dtype="<f4").tobytes(), "float32")
    with pytest.raises(ValueError, match="whole float32"):
        decode_samples(b"\x00" * 6, "float32")
