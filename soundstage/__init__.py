"""soundstage: resumable, cached preprocessing stages for audio-visual segmentation research."""

__version__ = "0.1.0"
