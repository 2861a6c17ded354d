B
zero_pointJусмгур	ъж