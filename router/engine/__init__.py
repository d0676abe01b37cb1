"""The step loop on the event loop (`AsyncEngine` driving `EngineCore`), its collaborators
(admission, outputs, accounting), and the clients that carry plans to the shards."""
