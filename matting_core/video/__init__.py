"""Video decoding and encoding with PyAV; folders of numbered frames read like videos."""
from matting_core.video.reader import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, VideoInfo,
                                       decode_image, frame_files, is_frame_folder, iter_frames,
                                       probe, video_stem)

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "VideoError", "VideoInfo", "decode_image",
           "frame_files", "is_frame_folder", "iter_frames", "probe", "video_stem"]
