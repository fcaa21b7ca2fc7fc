"""Video decoding and encoding with PyAV; folders of numbered frames read like videos."""
from matting_core.video.reader import (COUNT_TOLERANCE, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError,
                                       VideoInfo, decode_image, frame_files, frame_number, is_frame_folder,
                                       iter_frames, numbered_frame_files, numbering_gaps, prefetch, probe,
                                       video_stem)
from matting_core.video.writers import (AlphaPngWriter, AvVideoWriter, BackgroundStream, CompositeWriter,
                                        ForegroundPngWriter, frame_name, parse_color, quantize_alpha,
                                        read_alpha_video, read_rgba_video, rgba_mov_writer,
                                        rgba_webm_writer, to_rgba)

__all__ = ["COUNT_TOLERANCE", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "VideoError", "VideoInfo", "decode_image",
           "frame_files", "frame_number", "is_frame_folder", "iter_frames", "numbered_frame_files", "numbering_gaps",
           "prefetch", "probe", "video_stem",
           "AlphaPngWriter", "AvVideoWriter", "BackgroundStream", "CompositeWriter", "ForegroundPngWriter",
           "frame_name", "parse_color", "quantize_alpha", "read_alpha_video", "read_rgba_video",
           "rgba_mov_writer", "rgba_webm_writer", "to_rgba"]
