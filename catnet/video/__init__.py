"""Video input: probe + seek-decode (decode.py), clip sampling (sampling.py), crops (transforms.py),
all tied together by `load_clips` (clips.py). See docs/video.md."""

from catnet.video.clips import Clips, load_clips
from catnet.video.decode import VideoInfo, probe, read_frames
from catnet.video.sampling import ClipSampling, clip_times, sample_clips
from catnet.video.transforms import SpatialConfig, test_views, train_view

__all__ = ["Clips", "ClipSampling", "SpatialConfig", "VideoInfo", "clip_times", "load_clips", "probe",
           "read_frames", "sample_clips", "test_views", "train_view"]
