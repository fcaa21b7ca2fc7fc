"""Joining video files encoded with the same settings into one, without re-encoding (PyAV remux).

Segments of one video are encoded by different workers with identical encoder settings, so their
packets can be copied one after another with shifted timestamps: VP9 with alpha (the alpha
travels as Matroska BlockAdditional side data with each packet), ProRes 4444 and H.264 alike.
"""
from __future__ import annotations

from typing import Sequence

import av

__all__ = ["concat_videos"]


def concat_videos(parts: Sequence[str], out_path: str) -> int:
    """Write the video streams of `parts` (local files, in order) one after another to `out_path`.

    Returns the number of packets written.

    Raises ValueError naming the part whose codec, size or time base differs from the first's.
    """
    if not parts:
        raise ValueError("nothing to join")
    written = 0
    with av.open(out_path, "w") as out:
        ost, first = None, None
        end = last_dts = None  # in the shared time base: where the previous part ended
        for part in parts:
            with av.open(part) as inp:
                ist = inp.streams.video[0]
                shape = (ist.codec_context.name, ist.codec_context.width, ist.codec_context.height, ist.time_base)
                if ost is None:
                    ost, first = out.add_stream_from_template(ist), shape
                elif shape != first:
                    raise ValueError(f"{part}: encoded as {shape}, the first part as {first}: cannot be joined")
                rate = ist.average_rate or ist.guessed_rate or 25
                period = max(1, round(1 / (rate * ist.time_base)))
                packets = [p for p in inp.demux(ist) if p.dts is not None]  # None: the final flush packet
                if not packets:
                    continue
                shift = 0
                if end is not None:
                    # the part starts where the last one ended, and decoding order stays increasing
                    # (with B-frames a part's first dts lies before its first pts)
                    shift = max(end - min(p.pts for p in packets), last_dts + 1 - packets[0].dts)
                for packet in packets:
                    packet.pts += shift
                    packet.dts += shift
                    end = max(end or 0, packet.pts + (packet.duration or period))
                    last_dts = packet.dts
                    packet.stream = ost
                    out.mux(packet)
                    written += 1
    return written
