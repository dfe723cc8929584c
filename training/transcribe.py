"""Transcribe audio files or directories: python training/transcribe.py MODEL FILE_OR_DIR [...]"""

import sys

from data2vec_aqc_hf.transcription import main

if __name__ == "__main__":
    sys.exit(main())
