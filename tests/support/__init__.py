"""What many tests build: tiny random checkpoints and workers (`tiny`), scheduler plans and
fabricated results (`scheduling`), template tokenizers (`templates`), tensor-parallel ranks
(`tp`), and family checkpoints in their official layouts (`families`)."""
