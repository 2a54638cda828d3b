"""The model components, one file per component, and the protocols they implement
(`protocols`): the batch data passed through a model (`batch`), rotary position
embeddings (`rotary`), the Llama decoder (`llama`), the CLIP tower (`clip`), LLaVA's
assembly and forward passes (`llava`), LLaVA-NeXT's anyres grid (`anyres`) and the
configs (`config`). A family's registration (`shortv.family`, `shortv.families`) sits
above, with the loader.

Nothing is imported here: each name is imported from the module that defines it."""
