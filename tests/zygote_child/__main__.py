from tests.zygote_child import main

main()
