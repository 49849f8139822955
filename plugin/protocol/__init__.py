"""The wire contract between edge and cloud: tensor table, error codes, messages, codec, tensor conversions."""
