X = 'registry'
