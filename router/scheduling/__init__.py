"""Which tokens run in the next step: the scheduler, its sequences, and KV block accounting."""
