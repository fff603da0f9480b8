"""Media in and out: decoding audio and video with PyAV, the words a file carries, synthetic corpora."""
