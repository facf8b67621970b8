"""Model code that no maintained library provides (BEATs, the Kaldi fbank front end, ...)."""
