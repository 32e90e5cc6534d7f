"""The per-parameter-trace family of D-RTRL: its trace in dense, turned and masked
storage, the read-outs, and the chunked advance."""
