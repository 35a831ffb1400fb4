"""The kinds of peer (RLM agent, LLM, human, function) and the REPL runtime."""
